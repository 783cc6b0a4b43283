"""The KServe bundle, run exactly as KServe's TorchServe runtime runs it, over v1 and v2.

``make kserve-bundle``'s layout is built into a temporary folder and started with the runtime's
command line (``torchserve --start --model-store=... --ts-config=...``), with
``TS_SERVICE_ENVELOPE`` as KServe sets it (``kservev2`` for v2, ``kserve`` for v1) and the pod's
env from deploy/kserve/inferenceservice.yaml; only the ports and the /mnt/models paths are
substituted. No token (KServe's wrapper sends none). Real Java, real HTTP, real CIFAR-100 test
images; the reference answers come from the same network called in-process.
"""
from __future__ import annotations

import codecs
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from handler.protocols import OUTPUTS, ProtocolError, parse_request, plain_v2_body
from serving.settings import read_model_config
from serving.archive import weights_version
from serving.kserve import ENVELOPES, KServeTorchServe, build_bundle
from serving.process import free_ports, stop_process
from serving.settings import PREDICTOR_PORT_ENV
from serving.torchserve import read_properties
from serving_helpers import (assert_same_answer, b64, cifar_pil, decompression_bomb_png, encode, v1_body, v2_answers,
                             v2_body)
from checkout import user_in_a_copy
from torchserve_fixture import READY_TIMEOUT_S, stop_meanwhile, weights_under_test

REPO = Path(__file__).resolve().parents[1]

N_IMAGES = 200
CONCURRENCY = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(weights_under_test(), tmp_path_factory.mktemp("kserve") / "dist-kserve", quiet=True)


@pytest.fixture(scope="module", params=["v2", "v1"])
def kserve_ts(request, bundle, tmp_path_factory, pytestconfig):
    ts = KServeTorchServe(tmp_path_factory.mktemp(f"kserve-{request.param}"), bundle, request.param)
    ts.start()
    try:
        ts.wait_ready(READY_TIMEOUT_S)
        yield ts
    finally:
        stop_meanwhile(ts, pytestconfig)


def routes(ts: KServeTorchServe) -> list[str]:
    """Where a client of this protocol posts: TorchServe's own path (where KServe's wrapper
    forwards) and the protocol's path."""
    return [ts.predictions_url, ts.v2_infer_url if ts.protocol == "v2" else ts.v1_predict_url]


def body_for(ts: KServeTorchServe, images: list[bytes], request_id: str | None = None) -> dict:
    return v2_body(images, request_id) if ts.protocol == "v2" else v1_body(images)


def answers_of(ts: KServeTorchServe, response: httpx.Response) -> list[dict]:
    body = response.json()
    return v2_answers(body) if ts.protocol == "v2" else body["predictions"]


# ---- the bundle itself -----------------------------------------------------------------------
def test_bundle_layout_and_config(bundle):
    props = read_properties(bundle / "config" / "config.properties")
    assert (bundle / "model-store" / "cifar100.mar").is_file()
    assert props["enable_envvars_config"] == "false"  # TS_SERVICE_ENVELOPE ignored: batching survives
    assert props["disable_token_authorization"] == "true"
    assert props["metrics_mode"] == "prometheus" and props["metrics_address"].endswith(":8082")
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
    assert props["model_store"] == "/mnt/models/model-store"
    assert "service_envelope" not in props
    snapshot = json.loads(props["model_snapshot"])
    config = read_model_config()
    version = weights_version(weights_under_test())
    entry = snapshot["models"]["cifar100"][version]
    assert entry["marName"] == "cifar100.mar" and entry["defaultVersion"] is True
    assert entry["batchSize"] == config["batchSize"] > 1
    # Every worker setting of model-config.yaml: one the snapshot lacks is TorchServe's default, not the
    # archive's (startupTimeout: 120 s instead of 600, too short for a first start that compiles the engine).
    for key in ("minWorkers", "maxWorkers", "maxBatchDelay", "responseTimeout", "startupTimeout"):
        assert entry[key] == config[key], key


def test_make_kserve_bundle_command_writes_the_layout_and_reports_bad_weights(tmp_path):
    """`make kserve-bundle` runs this module as a program: its exit codes and messages, not only build_bundle."""
    run = [sys.executable, "-m", "serving.kserve", "--out"]
    done = subprocess.run([*run, str(tmp_path / "ok"), "--weights", str(weights_under_test())],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ok" / "model-store" / "cifar100.mar").is_file()
    assert (tmp_path / "ok" / "config" / "config.properties").is_file()
    done = subprocess.run([*run, str(tmp_path / "bad"), "--weights", str(tmp_path / "missing.pth")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and done.stderr.startswith("error:") and "missing.pth" in done.stderr


def stand_in_command(command):
    """KServePredictor.command for a stand-in: a sleeping Python with KServe's model server's arguments on its
    command line (what the pid file's check reads), no server."""
    return lambda self: [sys.executable, "-c", "import time; time.sleep(120)", *command(self)[1:]]


def stand_in_predictor(*args: str, checkout: Path | None = None) -> psutil.Process:
    """A sleeping Python with these model server's arguments, orphaned as `predictor start` leaves its server (a
    child of this process would stay a zombie once stopped, and stop would wait its whole timeout); with a
    `checkout`, started there in a session of its own, as `predictor start` starts it."""
    command = " ".join(shlex.quote(word) for word in ["setsid"] * (checkout is not None) + [
        sys.executable, "-c", "import time; time.sleep(120)", "-m", "handler.kserve_predictor", *args])
    launched = subprocess.run(["sh", "-c", f"{command} >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                              check=True, timeout=30, cwd=checkout)
    return psutil.Process(int(launched.stdout))


def alive(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def test_predictor_stop_leaves_another_instances_predictor_alone(tmp_path):
    """logs/kserve-predictor.pid outlives a predictor killed outright (kill -9, the OOM killer), and its pid goes
    to another predictor: another checkout's, or this bundle's on another port (a test's, a benchmark's). Any
    command line with handler.kserve_predictor counted: `make stop-kserve` (`predictor stop`, run here in a
    copy of the checkout as make runs it) killed that one. Only KServe's model server on this checkout's bundle
    and port counts now; the others are named and left alone. Stand-in processes, no server."""
    user = user_in_a_copy(tmp_path / "checkout", list(PREDICTOR_PORT_ENV.values()), 60)
    http, grpc = (user.env[PREDICTOR_PORT_ENV[kind]] for kind in ("http", "grpc"))
    bundle = (user.root / "dist" / "kserve").resolve()
    pid_file = user.root / "logs" / "kserve-predictor.pid"
    pid_file.parent.mkdir()
    started = [stand_in_predictor(f"--model_dir={tmp_path / 'other' / 'dist' / 'kserve'}", f"--http_port={http}",
                                  f"--grpc_port={grpc}"),  # another checkout's
               stand_in_predictor(f"--model_dir={bundle}", f"--http_port={free_ports(1)[0]}")]  # another port's
    try:
        for other in started:
            pid_file.write_text(f"{other.pid}\n")
            assert user.python("serving.kserve", "predictor", "status").returncode == 3
            done = user.python("serving.kserve", "predictor", "stop")
            assert done.returncode == 0 and "not running" in done.stdout, done.stdout + done.stderr
            assert f"names pid {other.pid}" in done.stderr and "left alone" in done.stderr, done.stderr
            assert alive(other), "stop killed another instance's predictor"
        ours = stand_in_predictor(f"--model_dir={bundle}", f"--http_port={http}", f"--grpc_port={grpc}")
        started.append(ours)
        pid_file.write_text(f"{ours.pid}\n")
        assert user.python("serving.kserve", "predictor", "status").returncode == 0
        done = user.python("serving.kserve", "predictor", "stop")
        assert done.returncode == 0 and f"stopped (pid {ours.pid})" in done.stdout, done.stdout + done.stderr
        assert not alive(ours) and not pid_file.exists()
        assert all(alive(other) for other in started[:2])
    finally:
        for process in started:
            stop_process(process.pid, timeout=5)


def test_a_predictor_started_on_another_port_keeps_its_pid_file_and_is_named(tmp_path):
    """`PREDICTOR_HTTP_PORT=28085 make serve-kserve`, then `make stop-kserve` without the variable: the stop said
    "not running", exited 0 and removed logs/kserve-predictor.pid, and nothing could stop that server after. Now
    status, stop and start name the port it was started with, stop and start fail, the file stays, and the stop
    with that port stops it. A stand-in process started in the checkout (as the server is) on its bundle."""
    user = user_in_a_copy(tmp_path / "checkout", list(PREDICTOR_PORT_ENV.values()), 60)
    pid_file = user.root / "logs" / "kserve-predictor.pid"
    pid_file.parent.mkdir()
    port = str(free_ports(1)[0])
    server = stand_in_predictor(f"--model_dir={(user.root / 'dist' / 'kserve').resolve()}", f"--http_port={port}",
                                checkout=user.root)
    try:
        pid_file.write_text(f"{server.pid}\n")
        said = f"started with {PREDICTOR_PORT_ENV['http']}={port}"
        done = user.python("serving.kserve", "predictor", "status")
        assert done.returncode == 3 and said in done.stdout, done.stdout + done.stderr
        # The line to run names the interpreter that ran it (bare `python` is the system's, without the packages).
        assert "-m serving.kserve predictor status" in done.stdout and " python -m" not in done.stdout, done.stdout
        for command in ("stop", "start"):
            done = user.python("serving.kserve", "predictor", command)
            assert done.returncode == 1 and said in done.stderr and "is kept" in done.stderr, done.stdout + done.stderr
            assert alive(server) and pid_file.read_text() == f"{server.pid}\n"
        done = user.python("serving.kserve", "predictor", "stop", **{PREDICTOR_PORT_ENV["http"]: port})
        assert done.returncode == 0 and f"stopped (pid {server.pid})" in done.stdout, done.stdout + done.stderr
        assert not alive(server) and not pid_file.exists()
    finally:
        stop_process(server.pid, timeout=5)


def test_an_interrupted_predictor_start_leaves_no_server_behind(tmp_path, monkeypatch):
    """Ctrl-C while `predictor start` (make serve-kserve) waits for the server to be ready: the server
    has a session of its own (the terminal's SIGINT misses it), so the command stops it; and its pid
    file named it from its start on (a start killed outright leaves a server that stop can find).
    A stand-in process instead of KServe's server; the interruption is raised in its readiness wait."""
    import serving.kserve as kserve
    from serving.process import stop_popen

    logs = tmp_path / "logs"
    pid_file = logs / "kserve-predictor.pid"
    monkeypatch.setattr(kserve, "LOG_DIR", logs)
    monkeypatch.setattr(kserve.KServePredictor, "command", stand_in_command(kserve.KServePredictor.command))
    for variable, port in zip(PREDICTOR_PORT_ENV.values(), free_ports(2)):
        monkeypatch.setenv(variable, str(port))
    (tmp_path / "bundle" / "model-store").mkdir(parents=True)
    (tmp_path / "bundle" / "model-store" / "cifar100.mar").touch()
    seen = {}

    def interrupted(is_ready, *args, **kwargs):
        seen["process"] = is_ready.__self__.process
        seen["pid file"] = pid_file.read_text() if pid_file.exists() else None
        raise KeyboardInterrupt
    monkeypatch.setattr(kserve, "wait_until_ready", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            kserve.main(["predictor", "start", "--bundle", str(tmp_path / "bundle")])
        assert seen["pid file"] == f"{seen['process'].pid}\n"
        assert seen["process"].poll() is not None, "the server outlived its interrupted start"
        assert not pid_file.exists()
    finally:
        if "process" in seen:
            stop_popen(seen["process"])


def test_start_warns_when_the_running_server_loaded_an_older_bundle(tmp_path, monkeypatch, capsys):
    """`make serve-kserve WEIGHTS=other.pth` while the server runs rebuilds the bundle but cannot swap
    the model: said, as TorchServe's start says it. A stand-in process as the running server."""
    import os

    import serving.kserve as kserve
    from serving.process import stop_popen

    logs = tmp_path / "logs"
    monkeypatch.setattr(kserve, "LOG_DIR", logs)
    http, grpc = free_ports(2)
    monkeypatch.setenv(PREDICTOR_PORT_ENV["http"], str(http))
    monkeypatch.setenv(PREDICTOR_PORT_ENV["grpc"], str(grpc))
    mar = tmp_path / "bundle" / "model-store" / "cifar100.mar"
    mar.parent.mkdir(parents=True)
    mar.touch()
    os.utime(mar, (time.time() - 3600,) * 2)  # built before the server started
    server = subprocess.Popen(stand_in_command(kserve.KServePredictor.command)(
        kserve.KServePredictor(logs, tmp_path / "bundle", port=http, grpc_port=grpc)))
    try:
        # Until its exec, the child's command line is pytest's: the pid file's check read that once on a loaded host.
        deadline = time.monotonic() + 30
        while "handler.kserve_predictor" not in psutil.Process(server.pid).cmdline() and time.monotonic() < deadline:
            time.sleep(0.05)
        (logs / "kserve-predictor.pid").parent.mkdir(parents=True)
        (logs / "kserve-predictor.pid").write_text(f"{server.pid}\n")
        argv = ["predictor", "start", "--bundle", str(tmp_path / "bundle")]
        assert kserve.main(argv) == 0
        assert "warning" not in capsys.readouterr().err
        mar.touch()  # rebuilt with other weights
        assert kserve.main(argv) == 0
        assert "keeps serving the model it loaded at its start" in capsys.readouterr().err
    finally:
        stop_popen(server)


@pytest.mark.parametrize("variable", PREDICTOR_PORT_ENV.values())
def test_a_predictor_port_that_is_no_number_is_a_one_line_error(variable, monkeypatch, capsys):
    import serving.kserve as kserve

    monkeypatch.setenv(variable, "80a5")
    assert kserve.main(["predictor", "status"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {variable}='80a5' is not a port number (1-65535)\n"


@pytest.mark.parametrize("text, said", [
    ("--http_port=9", "PREDICTOR_ARGS: --http_port=9: `predictor start` sets --http_port itself (PREDICTOR_HTTP_PORT)"),
    ("--max_client_share 0.5 --grpc 9", "--grpc: `predictor start` sets --grpc_port itself (PREDICTOR_GRPC_PORT)"),
    ("--host 0.0.0.0", "--host: `predictor start` sets --host itself"),
    ("--log_f /tmp/x", "--log_f: `predictor start` sets --log_file itself (logs/predictor.log)"),
    ("--model_dir=/x", "--model_dir=/x: `predictor start` sets --model_dir itself (the --bundle option)"),
    ("--trusted_proxies '10.0.0.1", "PREDICTOR_ARGS=\"--trusted_proxies '10.0.0.1\": No closing quotation"),
])
def test_predictor_args_that_start_sets_itself_or_that_do_not_split_are_a_one_line_error(text, said, monkeypatch,
                                                                                         capsys):
    import serving.kserve as kserve

    monkeypatch.setenv("PREDICTOR_ARGS", text)
    assert kserve.main(["predictor", "start"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1, err


def test_predictor_args_pass_every_other_option_as_a_shell_splits_it():
    from serving.kserve import predictor_args

    assert predictor_args({}) == []
    assert predictor_args({"PREDICTOR_ARGS": "--log_max_bytes 1048576 --log_backups=2 --trusted_proxies '10.0.0.1, "
                                             "10.0.0.2'"}) == ["--log_max_bytes", "1048576", "--log_backups=2",
                                                              "--trusted_proxies", "10.0.0.1, 10.0.0.2"]


# ---- request parsing, without a server -------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n..."


@pytest.mark.parametrize("body, status, words", [
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": [b64(PNG)]}]}, 400, "shape"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(PNG), b64(PNG)]}]}, 400, "shape"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, 400, "base64"),
    ({"inputs": []}, 400, "non-empty"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(PNG)]}],
      "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ({"instances": []}, 400, "non-empty"),
    ({"instances": [{"pixels": b64(PNG)}]}, 400, "instances[0]"),
    ({"instances": [b64(PNG)] * 65}, 413, "limit of 64"),
    ({"inputs": [{"name": "x", "shape": [0], "datatype": "BYTES", "data": []}]}, 400, "no image"),
    ({"id": 42, "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(PNG)]}]}, 400, "'id'"),
    # Each copy of an output would be answered: 30,000 copies made a 0.96 MB request a 107 MB answer.
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(PNG)]}],
      "outputs": [{"name": "name"}, {"name": "index"}, {"name": "name"}]}, 400, "['name'] asked more than once"),
    # Counted before any image is decoded: the 413, not the first element's 400.
    ({"instances": ["not base64!"] * 65}, 413, "65 images in one request, above the limit of 64"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}] * 65}, 413,
     "65 inputs in one request, above the limit of 64 images"),
    ({"inputs": [{"name": "x", "shape": [40], "datatype": "BYTES", "data": ["not base64!"] * 40}] * 2}, 413,
     "80 images in one request, above the limit of 64"),
    ({"inputs": [{"name": "x", "shape": [10**31] * 140, "datatype": "BYTES", "data": ["not base64!"]}]}, 400,
     "shape has 140 dimensions, more than 32"),
    ({"inputs": [{"name": "x", "shape": [1] * 33, "datatype": "BYTES", "data": ["not base64!"]}]}, 400,
     "shape has 33 dimensions"),
])
def test_malformed_protocol_bodies_are_refused_with_a_reason(body, status, words):
    with pytest.raises(ProtocolError) as err:
        parse_request({"body": body}, max_images=64)
    assert err.value.status == status and words in err.value.message


def test_a_request_of_exactly_the_image_limit_is_read_one_more_is_413():
    # handler.max_images_per_request: "more than 64 images in one request" is refused, 64 are answered.
    assert len(parse_request({"body": v1_body([PNG] * 64)}, max_images=64).images) == 64
    assert len(parse_request({"body": v2_body([PNG] * 64)}, max_images=64).images) == 64
    with pytest.raises(ProtocolError) as err:
        parse_request({"body": v2_body([PNG] * 65)}, max_images=64)
    assert err.value.status == 413 and "65 images in one request, above the limit of 64" in err.value.message


def test_torchserve_fields_are_decoded_as_its_worker_would_after_the_json_count():
    """decoded_fields, for a TorchServe worker whose own decoding is off (TS_DECODE_INPUT_REQUEST=false): JSON
    parsed by the field's content type (any charset), text decoded, an image and JSON that does not parse kept
    as bytes, and a JSON field of more values than its images need refused before it is parsed."""
    from handler.protocols import decoded_fields

    body = {"instances": [b64(PNG)]}
    headers = {"body": {"content-type": "application/json; charset=utf-8"}, "text": {"content-type": "text/plain"},
               "image": {"content-type": "image/png"}, "broken": {"content-type": "application/json"},
               "X-Request-ID": "7"}
    row = {"body": bytearray(json.dumps(body).encode()), "text": b"aGk=", "image": bytearray(PNG),
           "broken": b'{"instances": ['}
    assert decoded_fields(row, headers, 64) == {"body": body, "text": "aGk=", "image": PNG, "broken": b'{"instances": ['}
    assert decoded_fields(row, None, 64) == row  # no content types known: nothing decoded
    flood = {"body": json.dumps({"instances": [[]] * 6000}).encode()}
    with pytest.raises(ProtocolError) as err:
        decoded_fields(flood, headers, 64)
    assert err.value.status == 413 and "commas (values)" in err.value.message
    assert decoded_fields(flood, headers, 6000)["body"]["instances"][0] == []


def test_a_json_body_of_more_values_than_its_images_need_is_refused_by_counting_commas():
    """refuse_json_flood, before any parsing: within 16 MiB, 300,000 one-element inputs cost json.loads and the
    checks after it seconds of the event loop. A request of 64 images in tensors of their own is far below the
    limit; a body that is not JSON (an image: commas are bytes like any other) is not counted."""
    from handler.protocols import JSON_COMMAS_PER_IMAGE, JSON_COMMAS_SPARE, refuse_json_flood

    limit = 64 * JSON_COMMAS_PER_IMAGE + JSON_COMMAS_SPARE
    sixty_four = {"id": "7", "inputs": [{"name": f"image{i}", "shape": [1, 1, 1, 1], "datatype": "BYTES",
                                         "data": [[[["data:image/png;base64," + b64(PNG)]]]]} for i in range(64)],
                  "outputs": [{"name": name} for name in OUTPUTS]}
    refuse_json_flood(json.dumps(sixty_four).encode(), 64)
    refuse_json_flood(b"{" + b"," * limit + b"}", 64)
    refuse_json_flood(b"\x89PNG" + b"," * (limit + 1), 64)
    flood = json.dumps({"inputs": [{"name": "", "shape": [1], "datatype": "BYTES", "data": [""]}] * 2000}).encode()
    refuse_json_flood(b"\x00\x00\x01\x00" + b"," * (limit + 1), 64)  # an icon's nulls: not UTF-32 JSON
    # json.loads reads UTF-8 after a byte order mark, and UTF-16/32 with or without one: counted too.
    text = flood.decode()
    for body in (b"{" + b"," * (limit + 1) + b"}", b" \r\n\t" + flood, flood, codecs.BOM_UTF8 + flood,
                 text.encode("utf-16"), text.encode("utf-16-be"), text.encode("utf-32"), text.encode("utf-32-le")):
        assert body[:1] == b"{" or json.loads(body)
        with pytest.raises(ProtocolError) as err:
            refuse_json_flood(body, 64)
        assert err.value.status == 413 and f"above the limit of {limit}" in err.value.message
    refuse_json_flood(flood, 2000)  # the limit follows handler.max_images_per_request


def test_arrays_nested_without_commas_are_counted_too():
    """5,101 lists nested 900 deep (9 MB, no comma between them) passed the comma count: json.loads spent 2.8 s on
    them holding the event loop (v1: accepted). Arrays and objects count against the same limit now."""
    from handler.protocols import JSON_COMMAS_PER_IMAGE, JSON_COMMAS_SPARE, refuse_json_flood

    limit = 64 * JSON_COMMAS_PER_IMAGE + JSON_COMMAS_SPARE
    deep = b'{"instances": [{"data": "' + b64(PNG).encode() + b'"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ProtocolError) as err:
        refuse_json_flood(deep, 64)
    assert err.value.status == 413 and f"arrays and objects, above the limit of {limit}" in err.value.message
    refuse_json_flood(b"[" * (limit - 1) + b"{}" + b"]" * (limit - 1), 64)  # exactly the limit: passed on


def test_long_and_infinite_numbers_are_refused_as_they_are_read():
    """2,925 integers of 4,300 digits (12 MB) cost Python's parser 253 ms (twice on KServe's route) before a 400;
    1e999 was read as infinity. Each number is looked at as it is read now."""
    from handler.protocols import MAX_NUMBER_CHARACTERS, json_object

    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "id": "1", "n": [' + \
        b",".join([b"9" * 4300] * 2000) + b"]}"
    started = time.process_time()
    with pytest.raises(ProtocolError) as err:
        json_object(body)
    assert err.value.status == 400 and "a number of 4,300 characters" in err.value.message
    assert time.process_time() - started < 0.05
    for number in (b"1e999", b"-1e999"):
        with pytest.raises(ProtocolError) as err:
            json_object(b'{"n": ' + number + b"}")
        assert "is not a JSON number" in err.value.message
    assert json_object(b'{"shape": [1, 32, 32, 3], "x": 0.25, "y": -1e-3, "z": ' + b"9" * MAX_NUMBER_CHARACTERS + b"}")


def test_a_tensors_name_is_shown_cut_short_in_every_message():
    """A 4 MB name of control bytes, repeated in each of its 64 images' labels four characters a byte, cost a
    request 1 GB and seconds (12 MB: 3 GB, more than the pod's memory). Messages show 64 characters of it."""
    from handler.protocols import NAME_SHOWN

    name = "\x7f" * 4_000_000
    request = parse_request({"body": {"inputs": [{"name": name, "shape": [64], "datatype": "BYTES",
                                                  "data": [b64(PNG)] * 64}]}}, 64)
    assert len(request.images) == 64 and max(map(len, request.where)) < 4 * NAME_SHOWN + 40, request.where[0][:300]
    assert request.where[0] == f"inputs[0] ({ascii(name[:NAME_SHOWN])}...) data[0]"
    with pytest.raises(ProtocolError) as err:
        parse_request({"body": {"inputs": [{"name": name, "shape": [1], "datatype": "FP32", "data": [1.0]}]}}, 64)
    assert len(err.value.message) < 500, len(err.value.message)  # (was 16 MB)
    short = parse_request({"body": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                "data": [b64(PNG)]}]}}, 64)
    assert short.where == ["inputs[0] ('image') data[0]"]  # a name of up to NAME_SHOWN characters, whole


def test_an_empty_list_of_outputs_asks_for_every_output():
    """The protocol's "outputs" picks some; an empty list got 400 "unknown output(s) []"."""
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [b64(PNG)]}]}
    assert parse_request({"body": {**body, "outputs": []}}, 64).outputs == list(OUTPUTS)
    assert parse_request({"body": body}, 64).outputs == list(OUTPUTS)


def test_plain_bodies_stay_plain_and_json_sent_as_bytes_is_read():
    assert parse_request({"body": {"image": b64(PNG)}}, 64) is None
    assert parse_request({"body": bytearray(PNG)}, 64) is None
    assert parse_request({"image": bytearray(PNG)}, 64) is None
    as_bytes = parse_request({"body": bytearray(json.dumps(v2_body([PNG, PNG], "7")).encode())}, 64)
    assert as_bytes.images == [PNG, PNG] and as_bytes.request_id == "7"
    v1 = parse_request({"body": {"instances": [b64(PNG), {"b64": b64(PNG)}, {"data": b64(PNG)},
                                               {"image": {"b64": b64(PNG)}}]}}, 64)  # (the last: TF Serving's form)
    assert v1.images == [PNG] * 4 and v1.protocol == "v1"
    with pytest.raises(ProtocolError) as err:
        parse_request({"body": {"instances": [{"image": {"b64": 5}}]}}, 64)
    assert err.value.status == 400 and "instances[0].image.b64: expected a base64 string" in err.value.message


def test_only_plain_v2_json_bodies_are_taken_past_kserves_route():
    """KServe's predictor answers these itself (handler/kserve_predictor.py PlainV2Route); anything
    KServe's pydantic model would read otherwise, or whose parameters it acts on, stays KServe's."""
    body = v2_body([PNG], "7")
    as_json = json.dumps(body).encode()
    assert plain_v2_body("application/json", as_json) == body
    assert plain_v2_body("Application/JSON; charset=utf-8", as_json) == body
    assert plain_v2_body("application/json", json.dumps({**body, "outputs": [{"name": "name"}]}).encode())
    tensor = body["inputs"][0]
    not_plain = [
        ("application/x-www-form-urlencoded", as_json), ("", as_json), ("application/json", b'{"inputs": ['),
        ("application/json", b"[]"),
        ("application/json", json.dumps({**body, "parameters": {"binary_data_output": True}}).encode()),
        ("application/json", json.dumps({"inputs": [{**tensor, "parameters": {}}]}).encode()),
        ("application/json", json.dumps({"inputs": [{k: v for k, v in tensor.items() if k != "name"}]}).encode()),
        ("application/json", json.dumps({"inputs": [{**tensor, "shape": ["1"]}]}).encode()),  # pydantic coerces it
        ("application/json", json.dumps({"inputs": [{**tensor, "shape": [True]}]}).encode()),
        ("application/json", json.dumps({"inputs": [{**tensor, "data": "x"}]}).encode()),
        ("application/json", json.dumps({**body, "id": 7}).encode()),
        ("application/json", json.dumps({**body, "outputs": [{"name": "name", "parameters": {}}]}).encode()),
        ("application/json", json.dumps({"instances": [b64(PNG)]}).encode()),
    ]
    for content_type, raw in not_plain:
        assert plain_v2_body(content_type, raw) is None, (content_type, raw[:120])


# ---- the running bundle ----------------------------------------------------------------------
def test_test_split_in_this_protocol_gets_the_in_process_answer_with_batching(kserve_ts, client, reference,
                                                                              cifar100_test_split):
    images = cifar100_test_split[0][:N_IMAGES]
    expected = reference.probs_of_uint8(images)
    payloads = [encode(cifar_pil(images, i)) for i in range(N_IMAGES)]
    version = weights_version(weights_under_test())
    for url in routes(kserve_ts):
        def call(i):
            return client.post(url, json=body_for(kserve_ts, [payloads[i]], request_id=f"req-{i}"))
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            responses = list(pool.map(call, range(N_IMAGES)))
        batch_sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
        assert max(batch_sizes) > 1, f"{url}: no request shared a batch: {batch_sizes}"
        for i, r in enumerate(responses):
            assert r.status_code == 200, (url, r.text)
            if kserve_ts.protocol == "v2":
                body = r.json()
                assert (body["id"], body["model_name"], body["model_version"]) == (f"req-{i}", "cifar100", version)
                assert body["parameters"]["engine"] == reference.engine.name  # the forward pass that answered
            [answer] = answers_of(kserve_ts, r)
            assert_same_answer(answer, expected[i])


def test_several_images_in_one_request_get_one_answer_each_in_order(kserve_ts, client, reference,
                                                                    cifar100_test_split):
    images = cifar100_test_split[0][N_IMAGES:N_IMAGES + 5]
    expected = reference.probs_of_uint8(images)
    payloads = [encode(cifar_pil(images, i)) for i in range(5)]
    if kserve_ts.protocol == "v2":
        # Two inputs, the second a BYTES tensor of shape [2, 2]: five images in input order.
        body = {"inputs": [{"name": "first", "shape": [1], "datatype": "BYTES", "data": [b64(payloads[0])]},
                           {"name": "more", "shape": [2, 2], "datatype": "BYTES",
                            "data": [[b64(p) for p in payloads[1:3]], [b64(p) for p in payloads[3:]]]}]}
    else:
        body = {"instances": [{"data": b64(payloads[0])}, {"b64": b64(payloads[1])}] + [b64(p) for p in payloads[2:]]}
    for url in routes(kserve_ts):
        r = client.post(url, json=body)
        assert r.status_code == 200, r.text
        answers = answers_of(kserve_ts, r)
        assert len(answers) == 5
        for i, answer in enumerate(answers):
            assert_same_answer(answer, expected[i])
        if kserve_ts.protocol == "v2":
            assert "id" not in r.json()  # none was given
            outputs = {o["name"]: o for o in r.json()["outputs"]}
            assert outputs["topk_probability"]["shape"] == [5, 5] and outputs["label"]["shape"] == [5]


@pytest.mark.parametrize("kserve_ts", ["v2"], indirect=True)  # the outputs field is v2's
def test_v2_outputs_asked_for_are_the_ones_answered(kserve_ts, client, cifar100_test_split):
    body = {**v2_body([encode(cifar_pil(cifar100_test_split[0], 0))]), "outputs": [{"name": "name"}, {"name": "index"}]}
    r = client.post(kserve_ts.v2_infer_url, json=body)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["name", "index"]


def _truncated_png(img) -> bytes:
    data = encode(img.resize((128, 128)))
    return data[:len(data) // 2]


BAD_IMAGES = {
    "text": (lambda img: b"name,score\nalice,3\n" * 20, 400, "not an image"),
    "truncated PNG": (_truncated_png, 400, ""),
    "decompression bomb": (lambda img: decompression_bomb_png(), 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_gets_a_4xx_for_its_request_only(kserve_ts, client, reference, cifar100_test_split, case):
    build, status, words = BAD_IMAGES[case]
    images = cifar100_test_split[0][:8]
    good = [encode(cifar_pil(images, i)) for i in range(8)]
    bad = build(cifar_pil(images, 0))
    url = routes(kserve_ts)[-1]
    # The bad request (a good image first, then the bad one) among good ones sent at once: it must
    # fail alone, whichever batch it lands in.
    bodies = [body_for(kserve_ts, [g]) for g in good]
    bodies.insert(3, body_for(kserve_ts, [good[0], bad]))
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        responses = list(pool.map(lambda b: client.post(url, json=b), bodies))
    refused = responses.pop(3)
    assert refused.status_code == status, refused.text
    message = refused.json()["error"]
    assert words in message and ("data[1]" in message or "instances[1]" in message), message
    expected = reference.probs_of_uint8(images)
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert_same_answer(answers_of(kserve_ts, r)[0], expected[i])


def binary_extension_request(image: bytes) -> tuple[bytes, dict]:
    """A v2 request with the binary tensor extension, as tritonclient's binary_data=True sends it: a
    JSON head, then the BYTES element (4-byte little-endian length + the bytes); the head's length
    in Inference-Header-Content-Length."""
    element = len(image).to_bytes(4, "little") + image
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(element)}}]}).encode()
    return head + element, {"Inference-Header-Content-Length": str(len(head)),
                            "Content-Type": "application/octet-stream"}


def test_binary_extension_is_refused_by_name_not_as_not_an_image():
    with pytest.raises(ProtocolError) as err:
        parse_request({"body": bytearray(b"{}")}, 64, {"inference-header-content-length": "2"})
    assert err.value.status == 400 and "base64" in err.value.message
    # The header's name in any case (HTTP names are case-insensitive; tritonclient writes it capitalized).
    with pytest.raises(ProtocolError, match="binary tensor extension"):
        parse_request({"body": bytearray(b"{}")}, 64, {"Inference-Header-Content-Length": "2"})
    assert parse_request({"body": bytearray(PNG)}, 64, {"content-type": "image/png"}) is None


def test_a_binary_extension_request_gets_a_400_that_names_it(kserve_ts, client, cifar100_test_split):
    # Real TorchServe hands the HTTP headers to the handler; every route says the same.
    body, headers = binary_extension_request(encode(cifar_pil(cifar100_test_split[0], 0)))
    for url in routes(kserve_ts):
        r = client.post(url, content=body, headers=headers)
        assert r.status_code == 400, (url, r.text)
        message = r.json()["error"]
        assert "binary tensor extension" in message and "BYTES" in message and "base64" in message, message
        assert "not an image" not in message


def test_metrics_are_prometheus_text_without_a_token(kserve_ts, client, cifar100_test_split):
    r = client.get(f"{kserve_ts.metrics_url}/metrics")
    assert r.status_code == 200 and "ts_inference_requests_total" in r.text


def test_the_envelope_variable_is_set_and_ignored(kserve_ts):
    # KServe's variable reached Java, yet the handler answered every request of a batch (tests
    # above): TorchServe did not apply its envelope.
    import psutil

    java = psutil.Process(kserve_ts.java_pid())
    assert java.environ().get("TS_SERVICE_ENVELOPE") == ENVELOPES[kserve_ts.protocol]


@pytest.mark.parametrize("kserve_ts", ["v2"], indirect=True)  # the snapshot is the same for both
def test_the_bundles_workers_run_as_model_config_says(kserve_ts, client):
    """The bundle's model_snapshot is what TorchServe loads: each worker setting it lacks would be
    TorchServe's default (startupTimeout 120 s, too short for a first start that compiles the engine)."""
    described = client.get(f"{kserve_ts.management_url}/models/cifar100").json()[0]
    config = read_model_config()
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout"):
        assert described[key] == config[key], (key, described)


@pytest.mark.parametrize("kserve_ts", ["v2"], indirect=True)
def test_the_runtime_manifests_liveness_probe_fails_when_torchserve_stops_answering(kserve_ts):
    """The TorchServe runtime manifests' exec liveness probe, its own command run against this TorchServe (started
    as the runtime starts it): exit 0 while TorchServe's /ping and the wrapper's /v2/health/live answer; non-zero
    within the kubelet's timeout when Java is wedged (SIGSTOP: its port still open), or the wrapper says 503.
    KServe's wrapper cannot run here (it is the torchserve-kfs image's): a stand-in answers its liveness route."""
    from manifest_probes import KSERVE_DEPLOY, REST_PORT, LiveRoute, liveness_probe, run_exec_probe
    from serving.kserve import POD_ADDRESSES

    probe = liveness_probe(KSERVE_DEPLOY / "inferenceservice.yaml")
    pod_port = int(POD_ADDRESSES["inference_address"].rsplit(":", 1)[1])
    wrapper = LiveRoute()
    ports = {pod_port: kserve_ts.ports["inference"], REST_PORT: wrapper.port}
    try:
        assert run_exec_probe(probe["exec"]["command"], ports)[0] == 0
        java = psutil.Process(kserve_ts.java_pid())
        java.suspend()
        try:
            code, seconds = run_exec_probe(probe["exec"]["command"], ports)
        finally:
            java.resume()
        assert code != 0 and seconds < probe["timeoutSeconds"] + 1, (code, seconds)
        wrapper.status = 503
        assert run_exec_probe(probe["exec"]["command"], ports)[0] != 0
        wrapper.status = 200
        assert run_exec_probe(probe["exec"]["command"], ports)[0] == 0  # Java answers again after its pause
    finally:
        wrapper.close()


# ---- the /classify/ adapter in front of the bundle's v2 server (OIP_URL) -----------------------
@pytest.mark.parametrize("kserve_ts", ["v2"], indirect=True)  # the adapter speaks v2 to an OIP server
def test_adapter_in_front_of_the_v2_server_answers_classify_as_today(kserve_ts, reference, client,
                                                                     cifar100_test_split, tmp_path):
    from adapter.run import running_adapter
    from model.classes import display_name

    images = cifar100_test_split[0][1000:1100]
    expected = reference.probs_of_uint8(images)
    payloads = [encode(cifar_pil(images, i)) for i in range(len(images))]
    # No TorchServe key file, no management URL: only the OIP server's address.
    env = {"OIP_URL": kserve_ts.inference_url, "TS_MODEL_NAME": kserve_ts.model_name,
           "TS_KEY_FILE": str(tmp_path / "no-key-file.json"), "TS_INFERENCE_URL": "http://127.0.0.1:9",
           "TS_MANAGEMENT_URL": "http://127.0.0.1:9"}
    with running_adapter(env, tmp_path / "adapter.log") as adapter:
        def classify(data: bytes) -> httpx.Response:
            return client.post(f"{adapter.base_url}/classify/", files={"image": ("photo.png", data, "image/png")})

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            responses = list(pool.map(classify, payloads))
        version = weights_version(weights_under_test())
        for i, r in enumerate(responses):
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["prediction"] == display_name(body["label"]) == body["top5"][0]["name"]
            assert (body["label"], body["index"]) == (body["top5"][0]["label"], body["top5"][0]["index"])
            assert len(body["top5"]) == 5 and body["model_version"] == version and body["time_ms"] > 0
            assert_same_answer({"index": body["index"], "topk": body["top5"]}, expected[i])
        # The same error mapping as in front of TorchServe: the server's 4xx and message pass through.
        text = classify(b"name,score\nalice,3\n" * 20)
        assert text.status_code == 400 and "not an image" in text.json()["error"]
        bomb = classify(decompression_bomb_png())
        assert bomb.status_code == 413 and "limit" in bomb.json()["error"]
        assert classify(payloads[0]).status_code == 200


# ---- the benchmark's v2 point (figures are make bench-serve's job; here: it measures) -----------
@pytest.mark.integration  # starts TorchServe and reads CIFAR-100 in a subprocess (no fixture says so)
@pytest.mark.bench  # its own TorchServe and model server (~22 s): make test-bench
def test_bench_kserve_prints_each_target_and_the_ratios():
    import subprocess
    import sys
    from pathlib import Path

    # With the serving options make bench-serve passes it (BENCH_SERVE_ARGS): both servers run what they ask.
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_kserve", "--duration", "1", "--rounds", "1",
                           "--warmup", "0", "--concurrency", "2", "--engine", "eager-fp32", "--workers", "1"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Was the shipped model-config's engine (openvino-int8 here), and no word of it.
    assert "engine: TorchServe eager-fp32, KServe's model server eager-fp32 (" in done.stdout, done.stdout
    rows = [row for row in map(str.split, done.stdout.splitlines()) if len(row) == 6 and row[1] == "2"]
    assert sorted(row[0] for row in rows) == ["predictions", "predictor", "predictor-grpc", "v2"], done.stdout
    assert all(float(row[2]) > 0 and row[5] == "0" for row in rows), done.stdout
    assert "v2 / predictions images/s at concurrency 2:" in done.stdout and "failed" not in done.stdout
    assert "KServe's model server / TorchServe, v2, per round at concurrency 2:" in done.stdout
    assert "KServe's model server, gRPC / REST v2, per round at concurrency 2:" in done.stdout
