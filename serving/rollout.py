"""Put new weights into service on the running TorchServe without failing a request (``make rollout``).

    python -m serving.rollout --weights PATH [--ready-timeout S] [--drain-s 2] [--http-timeout 30]

  1. build the archive of PATH (serving/archive.py) as ``model_store/cifar100-<version>.mar``;
  2. register it beside the serving version (management API, management key), its workers as
     model-config.yaml says; wait until they are READY, then send it warm-up predictions on its own
     route (``/predictions/cifar100/<version>``), then one explanation per worker
     (``/explanations/cifar100/<version>``: a worker's first one builds its Grad-CAM model, ~1 s):
     every one must answer 200 from that version (an explanation with its heatmap); one not answered within
     ``--http-timeout`` is sent once more (a loaded host's first explanation on a worker), a second time withdraws it;
     each call waits at most what is left of ``--ready-timeout`` (the whole step is held to it);
  3. make it the default: from then on ``/predictions/cifar100`` (the adapter's route) reaches it;
  4. drain each old version (its queue empty, then ``--drain-s`` for the batches its workers hold)
     and unregister it; its rollout archive is deleted (``cifar100.mar``, make serve's, is kept).
If the new version is not READY and warm within ``--ready-timeout``, it is unregistered again, the
old one keeps serving, and the command exits 1 with the reason; Ctrl-C (SIGINT) or SIGTERM before the
switch does the same (exit 130 / 143). Rolling back is the same command with the previous weights.
Serving the version that is already the default only drains and unregisters the other versions still
registered (left by a rollout interrupted after its switch), if any (exit 0).

TorchServe must allow registration (``enable_model_api=true`` in config.properties; it listens on
loopback only, and every management call needs the management key), and ``allowed_urls=^$``
refuses archives from URLs: only files already in the model store can be registered.
One rollout at a time per TorchServe: a second one, while the first runs, is refused at once (exit 1)
naming the first (``logs/rollout.lock``, an flock the system releases when its process ends, however).
Keys expire (``token_expiration_min``): a refused key is read again from key_file.json and, if the
file still holds it, renewed with the API key (serving/keys.py), then the call is retried once; a key
still refused stops the rollout with that reason.
A restart (make serve) serves ``WEIGHTS`` again, the shipped ones by default: roll out, then
restart with ``make serve WEIGHTS=...`` to keep the new weights across restarts.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from serving import settings
from model.shipped import SHIPPED_WEIGHTS
from serving.archive import (ArchiveError, build_archive, calibration_warning, inputs_digest, int8_record_warning,
                             model_config_path, stamp_of, startup_timeout_s, weights_version)
from serving.cli import Parser, non_negative_float, positive_float
from serving.keys import KeyFile, KeyFileError, is_auth_refusal
from serving.process import changed_since_started, log_tail
from serving.torchserve import TorchServeError, TorchServeInstance, default_instance

MODEL_NAME = settings.MODEL_NAME
HTTP_TIMEOUT_S = 30.0  # one call's answer (--http-timeout): a loaded host's first explanation takes seconds
DRAIN_S = 2.0  # after an old version's queue is empty, for the batches its workers hold (--drain-s)
WARMUP_ROUNDS = 2  # warm-up predictions per worker of the new version
# Between two warm-up explanations, beyond the version's maxBatchDelay: TorchServe gives a batch to one worker
# and closes it maxBatchDelay after its first request, so each explanation sent later lands on another idle worker.
EXPLANATION_STAGGER_S = 0.05
EXPLANATION_ROUNDS = 3  # warm-up rounds for the workers still cold after the first


class RolloutError(RuntimeError):
    """The rollout stopped; the message says why (and what still serves)."""


def _more_time(option: str) -> str:
    """How a timeout's message ends: the option that holds the limit (the operator's lever)."""
    return f"a loaded host may need more: {option} (ROLLOUT_ARGS)"


class ServesWithLeftovers(RolloutError):
    """The new version serves (the default), but a step after the switch failed: an old version is still
    registered beside it. Exit status 3, so a CI job tells it from a rollout that left the old version serving."""


class RegistrationRefused(RolloutError):
    """TorchServe answered the registration of a new version with a refusal: nothing was registered."""


class CallTimedOut(RolloutError):
    """A call to TorchServe not answered within its timeout; the message names the API, the call and the option
    that holds the timeout (the operator's lever), and ``tries`` when it was sent more than once."""

    def __init__(self, kind: str, method: str, url: str, timeout_s: float, option: str, error: str, tries: int = 1):
        self.kind, self.method, self.url = kind, method, url
        self.timeout_s, self.option, self.error = timeout_s, option, error
        times = {1: "", 2: ", twice"}.get(tries, f", {tries} times")
        super().__init__(f"TorchServe's {kind} API did not answer {method} {url} within {timeout_s:g} s{times} "
                         f"({error}); {_more_time(option)}")

    def again(self) -> "CallTimedOut":
        """The same call timed out a second time."""
        return CallTimedOut(self.kind, self.method, self.url, self.timeout_s, self.option, self.error, tries=2)


class ReadyTimeUp(RolloutError):
    """--ready-timeout passed while the new version was getting READY and warm (ReadyDeadline.passed)."""


class ReadyDeadline:
    """--ready-timeout for the new version to be READY and warm: every call of that step waits at most what is
    left of it (each had a whole --http-timeout, a warm-up call twice: minutes past it on a slow host)."""

    def __init__(self, version: str, timeout_s: float):
        self.version, self.timeout_s, self.started = version, timeout_s, time.monotonic()

    def left_s(self) -> float:
        return self.timeout_s - (time.monotonic() - self.started)

    def passed(self, what: str) -> ReadyTimeUp:
        """The error when the time is out, ``what`` saying what was still awaited."""
        return ReadyTimeUp(f"version {self.version} was not READY and warm within {self.timeout_s:g} s: waited "
                            f"{time.monotonic() - self.started:.1f} s, {what}; {_more_time('--ready-timeout')}")


class Stopped(KeyboardInterrupt):
    """SIGTERM while the command runs (main), raised where the main thread is, as Ctrl-C raises KeyboardInterrupt:
    the same withdrawal runs for both."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def lock_path(ts: TorchServeInstance) -> Path:
    """The file whose flock one rollout at a time holds: in the instance's own folder (its logs)."""
    return ts.log_dir / "rollout.lock"


@contextmanager
def rollout_lock(path: Path, weights: Path):
    """Hold ``path``'s lock for one rollout; RolloutError at once, naming the holder, while another holds it.
    Two at once interleaved their steps: each registered its version, made it the default and unregistered
    the other's. An flock, not a pid file: the system releases it when its process ends, even by kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as held:  # not truncated before it is ours: it names the holder
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            holder = " ".join(held.read().split()) or "a process that has not written its name yet"
            raise RolloutError(f"another rollout is under way on this TorchServe ({holder}; lock {path}): "
                               "let it finish, then run this one again if it is still wanted") from None
        held.seek(0)
        held.truncate()
        since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        held.write(f"pid {os.getpid()}, since {since}, --weights {weights}\n")
        held.flush()
        try:
            yield
        finally:
            held.seek(0)
            held.truncate()  # unlocked when the file closes


def _warmup_png() -> bytes:
    """A 32x32 grey PNG: the shape the network runs on, through the handler's whole path."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _not_a_number(word: str):
    raise ValueError(f"{word} is not a JSON number")


def _answered_by(answer: httpx.Response) -> str | None:
    """The version a prediction's answer names; None for an answer that is not the handler's JSON, strictly
    read (NaN or infinity: weights that overflow; no client can parse it), whose probabilities are not numbers,
    or that names no class (the adapter answers 502 to such as it does, adapter/torchserve.py)."""
    try:
        body = json.loads(answer.content, parse_constant=_not_a_number)
    except ValueError:
        return None
    if not isinstance(body, dict) or not _is_probability(body.get("probability")):
        return None
    if not isinstance(body.get("label") or body.get("prediction"), str):
        return None
    return body.get("model_version")


def _has_heatmap(answer: httpx.Response) -> bool:
    """An explanation's answer carries its Grad-CAM heatmap (a PNG data URL, handler/explain.py)."""
    try:
        heatmap = answer.json().get("heatmap")
    except (ValueError, AttributeError):
        return False
    return isinstance(heatmap, str) and bool(heatmap)


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _described(answer: httpx.Response) -> str:
    """A warm-up answer on one line: its status, the version that answered (when one did), its start."""
    by, text = _answered_by(answer), " ".join(answer.text.split())[:120]
    return f"{answer.status_code} from version {by}: {text}" if by else f"{answer.status_code} {text}"


def _say(line: str) -> None:
    print(line, flush=True)  # at once: under make or CI stdout is a pipe, and the error line that ends it goes to stderr


@dataclass
class Rollout:
    ts: TorchServeInstance
    ready_timeout_s: float = field(default_factory=startup_timeout_s)  # a first start compiles its engine
    drain_s: float = DRAIN_S
    say: callable = _say
    http_timeout_s: float = HTTP_TIMEOUT_S
    model_config: Path = field(default_factory=model_config_path)  # the one the new version's archive packs

    def __post_init__(self):
        self.keys = KeyFile(self.ts.key_file.path)
        self.http = httpx.Client(timeout=self.http_timeout_s)
        self._renew_lock = threading.Lock()  # the warm-up's threads refused at once renew once
        self._ts_log_offset: int | None = None  # ts_log.log's size before the new version was registered
        self._stopping = threading.Event()  # interrupted: the warm-up's threads send nothing more

    # ---- the management API ----------------------------------------------------------------
    def _header(self, kind: str) -> dict[str, str]:
        try:
            return self.keys.header(kind)
        except KeyFileError as err:
            raise RolloutError(f"no {kind} key for the running TorchServe: {err}") from None

    def _fresh_header(self, kind: str, refused: dict[str, str], timeout_s: float) -> dict[str, str]:
        """A key other than the refused one: the file read again, else a key renewed with the API key (PUT /token,
        within ``timeout_s``: --http-timeout's, or less)."""
        with self._renew_lock:
            header = self._header(kind)
            if header != refused:  # renewed meanwhile (another thread, TorchServe restarted)
                return header
            try:
                self.keys.renew(self.ts.management_url, kind, timeout_s)
            except httpx.TimeoutException as err:  # a slow answer, not a wrong key file
                raise CallTimedOut("management", err.request.method, str(err.request.url), timeout_s,
                                   "--http-timeout", type(err).__name__) from None
            except (KeyFileError, httpx.HTTPError) as err:
                raise RolloutError(f"TorchServe refused the {kind} key of {self.keys.path} (expired?) and renewing "
                                   f"it with the API key failed ({type(err).__name__}: {err}); is that the "
                                   f"running TorchServe's key file?") from None
            return self._header(kind)

    def _timeout_s(self, option: str) -> float:
        """The value of the option that limits a call: --http-timeout for one answer, --ready-timeout for an
        unregister (TorchServe answers it once the version's workers have stopped)."""
        return {"--http-timeout": self.http_timeout_s, "--ready-timeout": self.ready_timeout_s}[option]

    def _call(self, method: str, path: str, kind: str = "management", base: str | None = None,
              limit: str = "--http-timeout", deadline: ReadyDeadline | None = None, **kwargs):
        """One call with the ``kind`` key, within the ``limit`` option's seconds; a refused key is renewed (within
        --http-timeout) and the call sent once more. With ``deadline``, each of those waits at most what is left of
        it (a renewal and a resend each had the whole time left: the step ran past --ready-timeout)."""
        url = (base or self.ts.management_url) + path

        def within(seconds: float, what: str) -> float:
            if deadline is None:
                return seconds
            left_s = deadline.left_s()
            if left_s <= 0:
                raise deadline.passed(f"{what} not sent")
            return min(seconds, left_s)
        headers = self._header(kind)
        r = self._send(method, url, headers, kind, limit, within(self._timeout_s(limit), f"{method} {url}"), **kwargs)
        if not is_auth_refusal(r.status_code, r.text):
            return r
        # A key's renewal is one answer: --http-timeout's, whatever holds the call itself (an unregister's is
        # --ready-timeout: a slow PUT /token held it that long and named --http-timeout).
        fresh = self._fresh_header(kind, headers, within(self.http_timeout_s, f"PUT {self.ts.management_url}/token"))
        r = self._send(method, url, fresh, kind, limit, within(self._timeout_s(limit), f"{method} {url}"), **kwargs)
        if is_auth_refusal(r.status_code, r.text):
            raise RolloutError(f"TorchServe refused the {kind} key of {self.keys.path}, even renewed: "
                               f"{r.status_code} {r.text.strip()[:200]}")
        return r

    def _send(self, method: str, url: str, headers: dict[str, str], kind: str, limit: str, timeout_s: float,
              **kwargs) -> httpx.Response:
        """One HTTP call to TorchServe's ``kind`` API (management, or inference: the warm-up); its failure is said
        naming that API and, for a timeout, the option that holds it (it was said as the management API's)."""
        try:
            return self.http.request(method, url, headers=headers, timeout=timeout_s, **kwargs)
        except httpx.TimeoutException as err:
            raise CallTimedOut(kind, method, url, timeout_s, limit, type(err).__name__) from None
        except httpx.HTTPError as err:
            raise RolloutError(f"TorchServe's {kind} API did not answer {method} {url} "
                               f"({type(err).__name__}: {err}); is TorchServe running?") from None

    def versions(self) -> list[dict]:
        r = self._call("GET", f"/models/{MODEL_NAME}/all")
        if r.status_code != 200:
            raise RolloutError(f"TorchServe does not serve {MODEL_NAME}: {r.status_code} {r.text.strip()[:200]}")
        return r.json()

    def default_version(self) -> str:
        r = self._call("GET", f"/models/{MODEL_NAME}")
        if r.status_code != 200:
            raise RolloutError(f"TorchServe does not serve {MODEL_NAME}: {r.status_code} {r.text.strip()[:200]}")
        return r.json()[0]["modelVersion"]

    def workers_rss_mb(self) -> tuple[int, float]:
        """(worker processes, their resident memory in MB): what an overlap costs."""
        pid = self.ts.java_pid()
        if pid is None:
            return 0, 0.0
        workers, rss = 0, 0
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:  # Java gone meanwhile
            return 0, 0.0
        for p in children:
            try:  # a worker may exit between the listing and these reads
                if "python" in p.name().lower():
                    rss += p.memory_info().rss
                    workers += 1
            except psutil.Error:
                pass
        return workers, rss / 1e6

    def _map(self, call, items: list, threads: int) -> list:
        """``call`` on each item from ``threads`` threads, the results in order; the first call to fail is raised at
        once and no call starts after it. Interrupted (Ctrl-C, SIGTERM), it does not wait for the calls under way
        (each up to --http-timeout, sent twice): the withdraw starts at once and none is sent again. Daemon threads:
        a ThreadPoolExecutor's are joined when the interpreter exits, so the withdrawn rollout's process lived on
        until its abandoned call ended, up to --http-timeout later."""
        results, failed, lock, finished = [None] * len(items), [], threading.Lock(), threading.Event()
        pending, running = iter(enumerate(items)), [min(threads, len(items))]

        def work():
            try:
                while not self._stopping.is_set() and not failed:
                    with lock:
                        index, item = next(pending, (None, None))
                    if index is None:
                        return
                    results[index] = call(item)
            except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
                failed.append(err)
                finished.set()
            finally:
                with lock:
                    running[0] -= 1
                    if running[0] == 0:
                        finished.set()
        if not items:
            return []
        for _ in range(running[0]):
            threading.Thread(target=work, daemon=True, name="rollout-call").start()
        try:
            finished.wait()
        except BaseException:
            self._stopping.set()
            raise
        if failed:
            self._stopping.set()
            raise failed[0]
        return results

    # ---- the steps ---------------------------------------------------------------------------
    def archive(self, weights: Path, version: str) -> Path:
        mar = self.ts.model_store / f"{MODEL_NAME}-{version}.mar"
        with tempfile.TemporaryDirectory(prefix="cifar100-rollout-") as tmp:
            built = build_archive(weights, Path(tmp), quiet=True, model_config=self.model_config)
            shutil.move(built, mar)
            # its inputs' digest beside it: a later rollout of the same weights tells a changed handler by it
            shutil.move(stamp_of(built), stamp_of(mar))
        self.say(f"built {mar.name} from {weights}")
        # make archive's warnings (quiet=True drops them with its other lines): e.g. no "unsure" ever, uncalibrated
        for warning in (calibration_warning(weights), int8_record_warning(weights)):
            if warning is not None:
                self.say(warning)
        return mar

    def register(self, mar: Path) -> None:
        r = self._call("POST", "/models", params={"url": mar.name, "model_name": MODEL_NAME, "synchronous": "false"})
        if r.status_code == 405:
            raise RegistrationRefused("TorchServe refuses to register models (enable_model_api=false in its "
                                      "config.properties): set enable_model_api=true and restart it (README, Operating)")
        if r.status_code not in (200, 202):
            raise RegistrationRefused(f"TorchServe refused to register {mar.name}: {r.status_code} {r.text.strip()[:300]}")

    def _call_by(self, deadline: ReadyDeadline, method: str, path: str, kind: str = "management",
                 base: str | None = None, **kwargs) -> httpx.Response:
        """``_call`` within what is left of ``deadline`` (--ready-timeout) as well as --http-timeout; a call (or a
        key's renewal) cut short by the deadline, or not sent for want of time, is ``deadline.passed``."""
        try:
            return self._call(method, path, kind, base, deadline=deadline, **kwargs)
        except CallTimedOut as err:
            if err.timeout_s >= self.http_timeout_s:  # --http-timeout's own limit: said as such
                raise
            raise deadline.passed(f"TorchServe's {err.kind} API had not answered {err.method} {err.url} "
                                  f"({err.error})") from None

    def wait_ready_and_warm(self, version: str) -> None:
        deadline = ReadyDeadline(version, self.ready_timeout_s)
        last = "not registered yet"
        # TorchServe retries a worker that dies loading the version until --ready-timeout: a few such deaths fail now.
        since = self._ts_log_offset if self._ts_log_offset is not None else self.ts.ts_log_size()

        def not_ready() -> RolloutError:
            return RolloutError(f"version {version} was not READY within {self.ready_timeout_s:g} s ({last});"
                                f" model log:\n{log_tail(self.ts.log_dir / 'model_log.log')}")
        while True:
            try:
                r = self._call_by(deadline, "GET", f"/models/{MODEL_NAME}/{version}")
            except ReadyTimeUp:  # this look cut short, or too late to send: the workers' last state says more
                raise not_ready() from None
            if r.status_code == 200:
                described = r.json()[0]
                workers = described.get("workers", [])
                last = f"workers {[w.get('status') for w in workers]}"
                if workers and all(w.get("status") == "READY" for w in workers):
                    break
            else:
                last = f"{r.status_code} {r.text.strip()[:200]}"
            if (failed := self.ts.load_failed(since, version, "it was registered")) is not None:
                raise RolloutError(f"version {version} will not get READY: {failed}; model log:\n"
                                   f"{log_tail(self.ts.log_dir / 'model_log.log')}")
            if deadline.left_s() <= 0:
                raise not_ready()
            time.sleep(max(0.0, min(0.5, deadline.left_s())))  # a last look at the deadline, none after it
        # Warm: a first batch per worker on the new version's own route; each answer must be its own.
        image, path = _warmup_png(), f"/predictions/{MODEL_NAME}/{version}"
        count = WARMUP_ROUNDS * len(workers)
        answers = self._map(lambda _: self._warm_up(path, image, deadline), list(range(count)), len(workers))
        bad = [_described(a) for a in answers
               if a.status_code != 200 or _answered_by(a) != version]
        if bad:
            raise RolloutError(f"version {version} is READY but its warm-up predictions failed: {bad[0]}")
        # And an explanation per worker: a worker's first one imports Captum and builds its explanation model
        # (~1 s, 9.6 s seen on a loaded host), which the adapter's /explain/ would otherwise pay after the switch.
        path = f"/explanations/{MODEL_NAME}/{version}"
        stagger = float(described.get("maxBatchDelay", 0)) / 1000 + EXPLANATION_STAGGER_S

        def explain(i: int) -> httpx.Response | ReadyTimeUp:
            if self._stopping.wait(i * stagger):  # interrupted while staggered: not sent
                return ReadyTimeUp("interrupted")
            try:
                return self._warm_up(path, image, deadline)
            except ReadyTimeUp as err:  # kept beside the round's answers: a failed one among them still counts
                return err
        cold = [str(w.get("id")) for w in workers]
        for round_ in range(EXPLANATION_ROUNDS):
            # A round for every worker, not just the cold ones: which idle worker takes a request is TorchServe's.
            outcomes = self._map(explain, list(range(len(workers))), len(workers))
            bad = [_described(a) for a in outcomes if isinstance(a, httpx.Response)
                   and (a.status_code != 200 or _answered_by(a) != version or not _has_heatmap(a))]
            if bad:
                raise RolloutError(f"version {version} is READY but its warm-up explanations failed: {bad[0]}")
            time_up = [a for a in outcomes if isinstance(a, ReadyTimeUp)]
            if time_up:
                if round_ == 0:  # not every worker has answered an explanation yet: not warm
                    raise time_up[0]
                break  # the version explains; only a worker left cold, as after the last round
            # Two sent close together (a loaded host's jitter) can share one worker's batch, leaving another cold.
            cold = self.cold_for_explanations(version, cold, wait_s=max(0.0, min(2.0, deadline.left_s())))
            if not cold:
                return
        self.say(f"warning: worker(s) {', '.join(cold)} of {version} did not log their explanation model ready "
                 f"after the warm-up{' (--ready-timeout passed)' if deadline.left_s() <= 0 else ''}; their first "
                 "/explain/ builds it")

    def _warm_up(self, path: str, image: bytes, deadline: ReadyDeadline) -> httpx.Response:
        """One warm-up call on the new version's own route, sent once more after a timeout: a loaded host's first
        explanation on a worker (Captum's import, the explanation model's build) can pass --http-timeout once, and
        the abandoned call still warms that worker. A second timeout withdraws the version, as does the end of
        ``deadline`` (--ready-timeout). (Safe to repeat: an answer changes nothing.)"""
        def send() -> httpx.Response:
            return self._call_by(deadline, "POST", path, "inference", self.ts.inference_url, content=image)
        try:
            return send()
        except CallTimedOut as first:
            if first.kind != "inference" or self._stopping.is_set():  # a key's renewal; or the rollout interrupted
                raise
            self.say(f"warning: {first}; sending it once more")
            try:
                return send()
            except CallTimedOut as second:
                raise (first.again() if second.kind == "inference" else second) from None

    def cold_for_explanations(self, version: str, worker_ids: list[str], wait_s: float = 2.0) -> list[str]:
        """Those of ``worker_ids`` whose "explanation model ready" line is not in model_log.log (the frontend
        writes a worker's lines from its own thread: looked for up to ``wait_s``). None cold without a log."""
        log_file = Path(self.ts.log_dir or "") / "model_log.log"
        said = settings.EXPLAINER_READY_LOG_LINE.split("%")[0]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                log = log_file.read_text(errors="replace")
            except OSError:
                return []
            cold = [i for i in worker_ids if f"W-{i}-{MODEL_NAME}_{version}-stdout MODEL_LOG - {said}" not in log]
            if not cold or time.monotonic() > deadline:
                return cold
            time.sleep(0.2)

    def switched_to(self, version: str) -> bool:
        """Whether ``version`` is the default after a switch interrupted or refused (unknown counts as not: the
        new version is withdrawn, and the old one, if it was not, is what the same command's next run finds)."""
        try:
            return self.default_version() == version
        except (RolloutError, KeyboardInterrupt):
            return False

    def set_default(self, version: str) -> None:
        r = self._call("PUT", f"/models/{MODEL_NAME}/{version}/set-default")
        if r.status_code != 200:
            raise RolloutError(f"could not make {version} the default: {r.status_code} {r.text.strip()[:200]}")

    def drain_and_unregister(self, version: str, url: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:  # requests queued for it before the switch
            r = self._call("GET", f"/models/{MODEL_NAME}/{version}")
            pending = (r.json()[0].get("jobQueueStatus") or {}).get("pendingRequests", 0) if r.status_code == 200 else 0
            if not pending:
                break
            if time.monotonic() >= deadline:
                self.say(f"warning: {version} still has {pending} request(s) queued after --ready-timeout "
                         f"({self.ready_timeout_s:g} s): unregistered all the same, TorchServe never answers them")
                break
            time.sleep(0.2)
        time.sleep(self.drain_s)  # the batches its workers hold
        r = self._call("DELETE", f"/models/{MODEL_NAME}/{version}", limit="--ready-timeout")
        if r.status_code != 200:
            raise ServesWithLeftovers(f"the new version serves, but unregistering {version} failed: "
                                      f"{r.status_code} {r.text.strip()[:200]}")
        if url.startswith(f"{MODEL_NAME}-") and url.endswith(".mar"):  # a rollout's archive, not make serve's
            (self.ts.model_store / url).unlink(missing_ok=True)
            stamp_of(self.ts.model_store / url).unlink(missing_ok=True)
        self.say(f"drained and unregistered {version}")

    def unregister_quietly(self, version: str) -> str | None:
        """Unregister ``version`` after a failed step; None when done, else why it is still registered."""
        try:
            r = self._call("DELETE", f"/models/{MODEL_NAME}/{version}", limit="--ready-timeout")
        except RolloutError as err:
            return str(err)
        return None if r.status_code in (200, 404) else f"{r.status_code} {r.text.strip()[:200]}"

    def given_up(self, version: str, old: str, err: RolloutError) -> RolloutError:
        """``version`` failed before the switch: unregistered (its archive gone); the error to raise says so."""
        left = self.unregister_quietly(version)
        if left is not None:
            return RolloutError(f"{err}\n{old} still serves; unregistering {version} failed too ({left}): "
                                f"the same command with {old}'s weights unregisters it")
        self.remove_archive(version)
        return RolloutError(f"{err}\n{old} still serves; {version} was unregistered")

    def withdraw(self, version: str, old: str) -> None:
        """After an interruption (Ctrl-C, SIGTERM) before the switch: ``version`` unregistered, its archive gone;
        ``old`` never stopped serving. Said, as the exception goes on to the caller."""
        self.say(f"interrupted: unregistering {version} ({old} still serves)")
        left = self.unregister_quietly(version)
        if left is not None:
            self.say(f"unregistering {version} failed ({left}): the same command with {old}'s weights unregisters it")
            return
        self.remove_archive(version)
        self.say(f"{version} was unregistered; {old} still serves")

    def remove_archive(self, version: str) -> None:
        mar = self.ts.model_store / f"{MODEL_NAME}-{version}.mar"
        mar.unlink(missing_ok=True)
        stamp_of(mar).unlink(missing_ok=True)

    def served_inputs_differ(self, weights: Path, version: str, url: str) -> str | None:
        """Why the archive ``version`` was served from is not what ``weights`` would be packed with now (a changed
        handler, model-config.yaml or packaged file: the version names the weights only); None if it is, or if
        that cannot be told (no digest beside it)."""
        mar = self.ts.model_store / url
        stamp = stamp_of(mar)
        if not url or not stamp.is_file():
            return None
        if url == f"{MODEL_NAME}.mar" and changed_since_started(stamp, self.ts.java_pid()):
            return f"{mar} was rebuilt since TorchServe loaded it"
        if stamp.read_text().strip() != inputs_digest(weights, version, self.model_config):
            return f"{mar} was built from other inputs ({stamp})"
        return None

    # ---- the whole move ----------------------------------------------------------------------
    def run(self, weights: Path) -> str:
        """Serve ``weights``; returns the new version. RolloutError: the old version still serves. One rollout
        at a time per TorchServe (rollout_lock)."""
        with rollout_lock(lock_path(self.ts), weights):
            return self._run(weights)

    def _run(self, weights: Path) -> str:
        try:
            version = weights_version(Path(weights))
        except ArchiveError as err:
            raise RolloutError(str(err)) from None
        old = self.default_version()
        registered = {v["modelVersion"]: v.get("modelUrl", "") for v in self.versions()}
        if old == version:
            # Other versions still registered: a rollout interrupted after its switch left them.
            leftovers = {other: url for other, url in registered.items() if other != version}
            if (differ := self.served_inputs_differ(Path(weights), version, registered.get(version, ""))):
                raise RolloutError(
                    f"version {version} already serves {MODEL_NAME}, but {differ}: a changed handler/, "
                    "model-config.yaml or packaged file with the same weights keeps the version, which a rollout "
                    f"cannot swap for itself; `make stop && make serve WEIGHTS={weights}` serves the change")
            if not leftovers:
                self.say(f"version {version} already serves {MODEL_NAME}; nothing to do")
                return version
            self.say(f"version {version} already serves {MODEL_NAME}; unregistering the versions left "
                     f"registered beside it: {', '.join(leftovers)}")
            for other, url in leftovers.items():
                self.drain_and_unregister(other, url)
            self.say(f"done: {MODEL_NAME} serves {version}")
            return version
        before_workers, before_mb = self.workers_rss_mb()
        try:
            self._ts_log_offset = self.ts.ts_log_size()
            if version not in registered:  # (else: left by a failed run; wait for it again)
                try:
                    mar = self.archive(Path(weights), version)
                except ArchiveError as err:
                    raise RolloutError(str(err)) from None
                try:
                    self.register(mar)
                except RegistrationRefused as err:  # nothing registered: its archive goes
                    self.remove_archive(version)
                    raise RolloutError(f"{err}\n{old} still serves") from None
                except RolloutError as err:  # not answered, yet perhaps registered all the same
                    raise self.given_up(version, old, err) from None
                self.say(f"registered {version} beside {old}; waiting for its workers")
            try:
                self.wait_ready_and_warm(version)
            except RolloutError as err:
                raise self.given_up(version, old, err) from None
            during_workers, during_mb = self.workers_rss_mb()
            self.say(f"{version} is READY and warm; workers {before_workers} -> {during_workers}, their memory "
                     f"{before_mb:.0f} MB -> {during_mb:.0f} MB RSS during the overlap")
            try:
                self.set_default(version)
            except RolloutError as err:  # the switch refused or not answered: which version serves is asked
                if self.switched_to(version):
                    raise ServesWithLeftovers(f"{err}; yet {version} is the default: the same command again "
                                              f"unregisters {old}") from None
                raise self.given_up(version, old, err) from None
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Stopped) before the switch: its workers ran beside the old
            if self.switched_to(version):  # the switch was answered as the interrupt came
                self.say(f"interrupted after the switch: {version} serves; the same command again unregisters "
                         "the versions still registered beside it")
            else:
                self.withdraw(version, old)
            raise
        self.say(f"{version} is the default: {MODEL_NAME}'s requests go to it")
        try:
            for other, url in registered.items():
                if other != version:
                    self.drain_and_unregister(other, url)
        except KeyboardInterrupt:
            self.say(f"interrupted after the switch: {version} serves; the same command again unregisters the "
                     "versions still registered beside it")
            raise
        self.say(f"done: {MODEL_NAME} serves {version}")
        return version


def roll_out(ts: TorchServeInstance, weights: Path, ready_timeout_s: float, drain_s: float,
             http_timeout_s: float = HTTP_TIMEOUT_S, model_config: Path | None = None) -> int:
    """The command on ``ts``: its exit status. SIGTERM is raised as Stopped while it runs, so a stopped
    rollout withdraws its new version as Ctrl-C's does (the default action would end it on the spot)."""
    def stopped(signum, frame):
        raise Stopped(signum)
    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        Rollout(ts, ready_timeout_s, drain_s, http_timeout_s=http_timeout_s,
                model_config=model_config_path(model_config)).run(weights)
    except RolloutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3 if isinstance(err, ServesWithLeftovers) else 1
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"error: rollout interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser("serving.rollout", __doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS, help="the weights to serve")
    parser.add_argument("--ready-timeout", type=positive_float, default=None,
                        help="seconds the new version may take to be READY and warm (then: exit 1, old kept; "
                             "default: the model config's startupTimeout)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="the model-config.yaml the new version's archive packs (default: TS_MODEL_CONFIG, "
                             "else handler/model-config.yaml)")
    parser.add_argument("--drain-s", type=non_negative_float, default=DRAIN_S,
                        help="seconds an old version keeps its workers after its queue is empty")
    parser.add_argument("--http-timeout", type=positive_float, default=HTTP_TIMEOUT_S,
                        help="seconds one call to TorchServe (a management call, a warm-up prediction or "
                             "explanation) may take to answer; then the rollout stops, the old version kept (a "
                             "warm-up call is sent once more first); until the new version is READY and warm, "
                             "at most what is left of --ready-timeout")
    args = parser.parse_args(argv)
    try:
        model_config = model_config_path(args.model_config)
        ready_timeout = args.ready_timeout if args.ready_timeout is not None else startup_timeout_s(model_config)
        ts = default_instance()
    except (TorchServeError, ArchiveError) as err:  # a bad setting (TS_MANAGEMENT_PORT=abc): said, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ts.is_running():
        print("error: TorchServe is not running (make serve-torchserve)", file=sys.stderr)
        return 1
    return roll_out(ts, args.weights, ready_timeout, args.drain_s, args.http_timeout, model_config)


if __name__ == "__main__":
    sys.exit(main())
