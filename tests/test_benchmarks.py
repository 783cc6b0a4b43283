"""The serving benchmarks' parts: the wrk load generator (benchmarks/load.py) against the session's
real TorchServe and against stub servers that misbehave (slow, refusing, dropping connections), and
`python -m benchmarks.bench_serve`, `bench_adapter`, `bench_photos`, `bench_fairness`, `bench_predictor_memory`,
`bench_served_engines` (bench_kserve: tests/test_kserve.py) end to end on short runs, and stopped by a signal.

Those that start servers of their own (each ~13-30 s: their own adapter, TorchServe or KServe's model server) are
marked `bench`: `make test-bench` runs them, `make test` (CI's, within 30 minutes) the rest, which drive the same
parts (benchmarks/load.py, side_by_side, a stopped run's cleanup) through bench_serve on the session's TorchServe.

What is tested is that the figures are measured and failures are counted, not any speed: speed
is shown by `make bench`, never asserted by a test.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from benchmarks import load
from benchmarks.load import HttpTarget, measure_targets, multipart_image_bodies, run_wrk
from benchmarks.side_by_side import side_by_side
from ctrl_c import sigint_as_in_a_terminal
from serving_helpers import cifar_pil, encode
from stand_in_server import stand_in_server
from torchserve_fixture import weights_under_test

REPO = Path(__file__).resolve().parents[1]
# Every test here drives a real server with wrk, on CIFAR-100 test images.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cifar100_data_dir", "wrk")]


@pytest.fixture(scope="module")
def pngs(cifar100_test_split):
    return [encode(cifar_pil(cifar100_test_split[0], i)) for i in range(8)]


def png_target(ts, pngs, headers=None, expect='"prediction"') -> HttpTarget:
    return HttpTarget(ts.predictions_url, pngs, expect=expect,
                      headers=lambda: {**(ts.key_file.header("inference") if headers is None else headers),
                                       "Content-Type": "image/png"})


@contextmanager
def stub_server(mode: str, delay_s: float = 0.0) -> Iterator[str]:
    """A real HTTP/1.1 server on a free loopback port, run in a thread; its base URL. "slow": 200 with a
    prediction after delay_s (a slow or hung server); "503": refuses at once; "close": reads a request and
    closes the connection without an answer (a server that crashed)."""
    loop = asyncio.new_event_loop()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if mode == "close":
                    break
                if mode == "slow":
                    await asyncio.sleep(delay_s)
                    status, body = b"200 OK", b'{"prediction": "lion", "outputs": []}'
                else:
                    status, body = b"503 Service Unavailable", b'{"error": "busy"}'
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def stub_target(base: str) -> HttpTarget:
    return HttpTarget(f"{base}/predictions/x", [b"a body"], expect='"prediction"')


def test_servers_start_side_by_side_and_all_stop_when_one_fails():
    events: list[str] = []
    both_starting = threading.Barrier(2, timeout=10)  # broken unless the two starts overlap

    def fail():
        both_starting.wait()
        raise RuntimeError("c did not start")

    with side_by_side(stand_in_server("a", events, both_starting.wait),
                      stand_in_server("b", events, both_starting.wait)) as names:
        assert names == ["a", "b"] and sorted(events) == ["a up", "b up"]
    assert sorted(events) == ["a down", "a up", "b down", "b up"]
    events.clear()
    with pytest.raises(RuntimeError, match="c did not start"):
        with side_by_side(stand_in_server("a", events, both_starting.wait), stand_in_server("c", events, fail)):
            pytest.fail("entered though a server did not start")
    assert events == ["a up", "a down"]


INTERRUPTED_WHILE_STARTING = """
import atexit, json, os, signal, sys, time
sys.path.insert(0, "tests")
from benchmarks.side_by_side import side_by_side
from stand_in_server import stand_in_server

events = []

def interrupted_then_up():
    time.sleep(float(sys.argv[1]))
    for _ in range(int(sys.argv[2])):
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in the main thread
        time.sleep(0.1)
    time.sleep(0.3)

def interrupt(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGUSR1, interrupt)
atexit.register(lambda: print(json.dumps(events)))  # after the threads left running ended
try:
    with side_by_side(stand_in_server("a", events, interrupted_then_up), stand_in_server("b", events)):
        print("entered though interrupted")
except KeyboardInterrupt:
    pass
"""


@pytest.mark.parametrize("after_s, interrupts", [(0, 1), (0.1, 1), (0.1, 2)],
                         ids=["as the threads start", "while they are waited for", "twice"])
def test_an_interrupt_while_servers_start_waits_for_the_starts_and_stops_what_started(after_s, interrupts):
    """Ctrl-C (here SIGUSR1 raising KeyboardInterrupt: a background CI run ignores SIGINT) while the starts run: the
    start under way ends, and its server is stopped rather than left running; one not begun is not started. (A
    Thread.join() interrupted marks its thread as ended though it runs on: bench_adapter left TorchServe running.)
    A second Ctrl-C stops that wait: the start still under way then stops its server itself as it ends (it was left
    running). In a process of its own, as a benchmark runs: in pytest's, beside the threads earlier tests left, the
    signal sometimes crashed the interpreter (SIGSEGV, no traceback)."""
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_WHILE_STARTING, str(after_s), str(interrupts)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    events = json.loads(done.stdout)
    # a's start was under way: it came up (0.3 s after the last interrupt) and was stopped; b started or not, and is
    # not left running either.
    assert "a up" in events and all(events.count(f"{name} up") == events.count(f"{name} down") for name in "ab"), events


def test_a_hung_target_gives_no_clean_point(tmp_path):
    # Answers after 3 s, measured for 1 s: wrk ends with every request still waiting (it does not count them).
    with stub_server("slow", 3.0) as base:
        hung = run_wrk(stub_target(base), concurrency=2, duration_s=1, workdir=tmp_path)
    assert hung.images == 0 and math.isnan(hung.p50_ms) and math.isnan(hung.p99_ms), hung
    assert hung.errors == hung.unanswered == 2, hung
    # A target that answers: the requests in flight at the end of the point (the closed loop's normal
    # state) are no errors.
    with stub_server("slow", 0.01) as base:
        fine = run_wrk(stub_target(base), concurrency=2, duration_s=1, workdir=tmp_path)
    assert fine.images > 0 and fine.errors == fine.unanswered == 0 and 0 < fine.p50_ms <= fine.p99_ms, fine


def test_answers_slower_than_the_request_timeout_are_errors_not_images(monkeypatch, tmp_path):
    monkeypatch.setattr(load, "REQUEST_TIMEOUT_S", 1)  # stands for 30 s: the stub answers after 1.5 s
    with stub_server("slow", 1.5) as base:
        late = run_wrk(stub_target(base), concurrency=2, duration_s=3, workdir=tmp_path)
    # wrk counts a late answer as a request and as a timeout, and leaves it out of its latencies.
    assert late.images == 0 and late.errors >= 2 and math.isnan(late.p50_ms), late


def test_target_lines_say_nan_for_a_target_that_answered_nothing(tmp_path, capsys):
    from benchmarks.bench_adapter import target_lines

    with stub_server("slow", 0.01) as fast, stub_server("slow", 3.0) as hung:
        answered = run_wrk(stub_target(fast), concurrency=1, duration_s=1, workdir=tmp_path)
        nothing = run_wrk(stub_target(hung), concurrency=1, duration_s=1, workdir=tmp_path)
    rows = {"torchserve": {1: answered}, "adapter": {1: answered}, "seed-style": {1: nothing}}
    lines = target_lines(rows, 1, 1)
    assert lines[1].startswith("adapter / seed-style images/s at concurrency 1: nanx"), lines
    assert lines[2].endswith(" / nan ms (target: no higher)"), lines  # was "18.71 / 0.00 ms": a target met
    load.print_failures({name: list(by_c.values()) for name, by_c in rows.items()})
    out = capsys.readouterr().out
    assert "NO GOOD ANSWER from seed-style at concurrency 1" in out and "1 of them unanswered" in out, out
    assert "from adapter" not in out and "from torchserve" not in out, out


def test_soak_counts_only_answers_with_a_prediction(capsys):
    from benchmarks import soak

    with stub_server("503") as base:
        asyncio.run(soak.soak(base, [b"\x89PNG fake"], 300, 8, soak.RssSampler({})))
    out = capsys.readouterr().out
    assert "0 answered with a prediction (0 img/s)" in out, out  # was "(756 img/s)": refusals counted
    assert "statuses: {503: 300}; errors 300" in out and "p50, p99: none" in out, out
    with stub_server("slow", 0.01) as base:
        asyncio.run(soak.soak(base, [b"\x89PNG fake"], 40, 4, soak.RssSampler({})))
    out = capsys.readouterr().out
    assert "40 answered with a prediction" in out and "statuses: {200: 40}; errors 0" in out, out


def test_soak_measures_a_restarted_worker_and_names_the_restart(capsys):
    # The "worker" is a process the test replaces mid-run, as TorchServe replaces a worker that died.
    from benchmarks import soak

    def worker(megabytes: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"import time; b = bytearray({megabytes} << 20); "
                                 "b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"])

    workers = [worker(10)]
    old = workers[0]

    def restart():
        workers[0].kill()
        workers[0].wait()
        workers[0] = worker(200)
        time.sleep(1.5)  # its memory in place before the soak's last sample

    try:
        sampler = soak.RssSampler({"workers": lambda: [psutil.Process(p.pid) for p in workers if p.poll() is None]})
        time.sleep(1.5)
        threading.Timer(0.5, restart).start()
        with stub_server("slow", 0.05) as base:
            asyncio.run(soak.soak(base, [b"\x89PNG fake"], 80, 2, sampler))
    finally:
        for process in workers + [old]:
            process.kill()
            process.wait()
    out = capsys.readouterr().out
    before, after = (int(line.split("workers ")[1].split(" MB")[0]) for line in out.splitlines()
                     if line.startswith(("  RSS before", "  RSS after")))
    assert after > before + 100, out  # the new worker's memory, not the dead one's nothing
    assert f"workers [{old.pid}] -> [{workers[0].pid}]; RESTARTED: workers" in out, out


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                out.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR for a benchmark: under /tmp, as TorchServe's worker sockets there need a short path (an
    AF_UNIX path has at most 107 bytes; pytest's tmp_path leaves too few)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-tmp-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def signal_benchmark(argv: list[str], when, signum: int, tmp: Path) -> tuple[int, str, list[str]]:
    """Start ``python -m <argv>`` in a session of its own (TMPDIR=tmp), send ``signum`` to its python
    alone once ``when(output_lines, session_processes)`` is true; (its exit code, its output, the
    processes of its session still alive 30 s later). Those are killed: this test started them."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"},
                            preexec_fn=sigint_as_in_a_terminal)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while not when(lines, session_processes(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        proc.send_signal(signum)
        code = proc.wait(120)
        deadline = time.monotonic() + 30
        while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(1)
        return code, "".join(lines), [described(p) for p in left if p.is_running()]
    finally:
        for process in session_processes(proc.pid):
            try:
                process.kill()
            except psutil.Error:
                pass
        proc.kill()
        reader.join(10)


def described(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())[:150]}"
    except psutil.Error:
        return f"{process.pid}: gone"


def java_started(lines, processes) -> bool:
    # Java up for a while: the start's `torchserve --start` launcher has returned and written its pid file.
    def java_for_3_s(process):
        try:
            return "java" in process.name() and time.time() - process.create_time() > 3
        except psutil.Error:
            return False
    return any(java_for_3_s(p) for p in processes)


@pytest.mark.parametrize("signum, when, own_torchserve", [
    # `kill PID` while wrk measures: on the session's TorchServe (--running-torchserve), as the start's cleanup is
    # the case below's and SIGTERM's the served engines' test's (its own TorchServe cost ~15 s more here)
    (signal.SIGTERM, lambda lines, _: any(line.startswith("engine: ") for line in lines), False),
    (signal.SIGINT, java_started, True),  # Ctrl-C to the python alone, while its own TorchServe starts
], ids=["SIGTERM while measuring", "SIGINT while TorchServe starts"])
def test_a_stopped_benchmark_leaves_no_server_and_no_temporary_folder(signum, when, own_torchserve, short_tmp,
                                                                      request, monkeypatch):
    options = []
    if not own_torchserve:
        options = ["--running-torchserve"]
        for name, value in request.getfixturevalue("torchserve_ready").adapter_env().items():
            monkeypatch.setenv(name, value)
    code, out, left = signal_benchmark(["benchmarks.bench_serve", "--duration", "3", "--warmup", "1",
                                        "--concurrency", "1", "4", *options], when, signum, short_tmp)
    assert code != 0, out
    assert left == [], out  # were Java and its 2 workers (~1.9 GB), or wrk, alive
    assert list(short_tmp.glob("bench-serve-*")) == [], out


@pytest.mark.bench
def test_bench_served_engines_keeps_what_it_measured_when_stopped(tmp_path, short_tmp):
    # Stopped by SIGTERM (as gpu_check.sh's step limit stops it) after its first engine: that engine's
    # figures are in --out, and its second server and temporary folder are gone.
    out_file = tmp_path / "served.json"
    code, out, left = signal_benchmark(
        ["benchmarks.bench_served_engines", "--engines", "eager-fp32", "openvino-fp32", "--images", "20",
         "--concurrency", "1", "--duration", "0.5", "--warmup", "0.2", "--out", str(out_file)],
        lambda lines, _: any(line.startswith("eager-fp32 (served: ") for line in lines), signal.SIGTERM, short_tmp)
    assert code != 0 and left == [], out
    figures = json.loads(out_file.read_text())
    assert figures["engines"]["eager-fp32"]["concurrency_1"]["images_per_s"] > 0, figures
    assert list(short_tmp.glob("bench-served-engines-*")) == [], out


def test_bench_served_engines_counts_dropped_connections_as_failed_requests():
    # A predictor that dies mid-run drops its connections: failed requests, not the end of the run.
    from benchmarks.bench_served_engines import drive, top1_answers

    with stub_server("close") as base:
        url = f"{base}/v2/models/cifar100/infer"
        driven = asyncio.run(drive(url, [b"{}"], 2, 1.0))
        answers, named = asyncio.run(top1_answers(url, [b"{}"] * 4, 2))
    assert driven["failed"] > 0 and driven["images_per_s"] == 0 and driven["p50_ms"] is None, driven
    assert answers == [None] * 4 and named == set()


def test_wrk_measures_answered_requests(torchserve_ready, pngs, tmp_path):
    result = run_wrk(png_target(torchserve_ready, pngs), concurrency=2, duration_s=1, workdir=tmp_path)
    assert result.errors == 0
    assert result.images > 0 and result.images_per_s > 0
    assert 0 < result.p50_ms <= result.p99_ms


def test_wrk_counts_refused_requests_and_wrong_answers_as_errors(torchserve_ready, pngs, tmp_path):
    refused = run_wrk(png_target(torchserve_ready, pngs, headers={"Authorization": "Bearer not-the-key"}),
                      concurrency=2, duration_s=1, workdir=tmp_path)
    assert refused.images == 0 and refused.errors > 0
    wrong = run_wrk(png_target(torchserve_ready, pngs, expect="text no answer contains"),
                    concurrency=2, duration_s=1, workdir=tmp_path)
    assert wrong.images == 0 and wrong.errors > 0


def test_multipart_bodies_are_read_as_the_image_field(torchserve_ready, pngs, tmp_path):
    bodies, content_type = multipart_image_bodies(pngs, "image")
    ts = torchserve_ready
    target = HttpTarget(ts.predictions_url, bodies, expect='"prediction"',
                        headers=lambda: {**ts.key_file.header("inference"), "Content-Type": content_type})
    rows = measure_targets({"multipart": target}, [1, 3], duration_s=1, workdir=tmp_path, warmup_s=1)
    assert set(rows["multipart"]) == {1, 3}
    for result in rows["multipart"].values():
        assert result.errors == 0 and result.images > 0


def run_benchmark(module: str, columns: tuple[str, ...], warmup: str = "0.5", *options: str,
                  env: dict[str, str] | None = None) -> list[str]:
    """`python -m benchmarks.<module>` on 1 s points at concurrency 2 alone (`warmup` s of warm-up, wrk's shortest
    point being 1 s; 0: none; a second concurrency cost each target another point: 7 s of the two tests), with these
    other `options` and `env` over the environment: its output lines, after checking that it succeeded and that each
    column has its row with images/s and no failed request (the table: target, conc, img/s, p50, p99, errors)."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--duration", "1", "--warmup", warmup,
                           "--concurrency", "2", *options], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in columns:
        rows = [row for row in map(str.split, lines) if len(row) == 6 and row[0] == name]
        assert [row[1] for row in rows] == ["2"], done.stdout
        assert all(float(row[2]) > 0 and row[5] == "0" for row in rows), done.stdout
    assert "failed" not in done.stdout
    return lines


def test_bench_serve_prints_both_columns_and_the_two_ratios(torchserve_ready):
    # The session's TorchServe (`make bench-serve` starts its own, as the signal tests above do: ~15 s more here), the
    # in-process column on the weights it serves.
    lines = run_benchmark("bench_serve", ("in-process", "torchserve"), "0.5", "--running-torchserve",
                          "--weights", str(weights_under_test()), env=torchserve_ready.adapter_env())
    assert " cores" in lines[0], lines  # which machine the figures are from
    assert any(line.startswith("torchserve / in-process images/s at concurrency 2:") for line in lines), lines
    assert any(line.startswith("torchserve p50 - in-process p50 at concurrency 2:") for line in lines), lines


@pytest.mark.bench
def test_bench_adapter_prints_both_paths_and_its_targets(torchserve_ready):
    # The session's TorchServe (--running-torchserve; `make bench-serve` starts its own: ~10 s more on an AVX2 EPYC),
    # its own adapter and seed-style server, and KServe's model server with an adapter in OIP mode in front, as
    # `make bench-serve` does. Cold: 10 points of warm-up cost 10 s, and the warm-up is bench_serve's test's.
    lines = run_benchmark("bench_adapter", ("torchserve", "adapter", "seed-style", "predictor", "adapter-oip"),
                          "0", "--running-torchserve", "--weights", str(weights_under_test()),
                          env=torchserve_ready.adapter_env())
    assert any(line.startswith("adapter p50 - torchserve p50 at concurrency 2:") for line in lines), lines
    assert any(line.startswith("adapter / seed-style images/s at concurrency 2:") for line in lines), lines
    assert any(line.startswith("without TorchServe: adapter-oip / seed-style images/s at concurrency 2:")
               for line in lines), lines


@pytest.mark.bench
def test_bench_predictor_memory_prints_the_peak_with_and_without_the_bound():
    # KServe's model server started twice on one bundle, a small flood each, over gRPC only (~13 s here; REST's
    # flood differs by its sender alone, and the small requests sent meanwhile go over REST).
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_predictor_memory", "--clients", "3", "--body-mib",
                           "1", "--rounds", "1", "--over", "grpc"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and "MB" not in line and "---" not in line]
    assert [row[:2] for row in rows] == [["grpc", "96 MiB"], ["grpc", "unbounded"]], done.stdout
    for row in rows:
        before, peak, slowest = float(row[2]), float(row[3]), float(row[6])
        # each read and refused as no image
        assert 0 < before <= peak and row[4] == "{'INVALID_ARGUMENT': 3}" and slowest >= 0, row


@pytest.mark.bench
def test_bench_photos_prints_the_three_paths_with_their_cpu_per_photo(torchserve_ready):
    # The session's TorchServe (--running-torchserve) and two adapters, 12 MP JPEGs at concurrency 1 only, cold.
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_photos", "--duration", "1", "--warmup", "0",
                           "--concurrency", "1", "--running-torchserve"],
                          cwd=REPO, env={**os.environ, **torchserve_ready.adapter_env()}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(" cores" in line for line in lines[:2]), lines  # the CPU, beside TorchServe's start-up line
    for path in ("whole file (SHRINK_UPLOADS=0)", "shrunk in the adapter", "shrunk by the page"):
        row = next(line for line in lines if line.startswith(path))[len(path):].split()
        # conc, photos/s, p50, p99, then CPU ms per photo: adapter, java, workers, wrk, total
        assert row[0] == "1" and float(row[1]) > 0 and len(row) == 9 and float(row[-1]) > 0, row
    assert "errors" not in done.stdout


@pytest.mark.bench
def test_bench_fairness_prints_the_probe_beside_each_kind_of_load(torchserve_ready):
    # An adapter per phase in front of the session's TorchServe (its own cost ~12 s to start and stop): 2.5 s
    # phases (the probe's last 0.5 s), small loads.
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_fairness", "--duration", "2.5", "--rounds", "1",
                           "--addresses", "2", "--per-address", "1", "--explanation-caps", "64", "1",
                           "--photo-addresses", "1", "--photos-per-address", "1",
                           "--floods", "/metrics", "--flood-connections", "2", "--running-torchserve"],
                          cwd=REPO, env={**os.environ, **torchserve_ready.adapter_env()},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("round 1, ")]
    assert " cores" in done.stdout.splitlines()[0], done.stdout
    assert [line.split(":")[0] for line in lines] == [
        "round 1, quiet", "round 1, explanations from 2 x 1, MAX_EXPLANATIONS_IN_FLIGHT=64",
        "round 1, explanations from 2 x 1, MAX_EXPLANATIONS_IN_FLIGHT=1", "round 1, 12 MP photos from 1 x 1",
        "round 1, GET /metrics from 1 x 2"], lines
    for line in lines:
        probe = line.split("the probe's /classify/ ")[1]
        assert probe.startswith("p50 ") and "{200: " in probe and "no answer" not in line, line
    # The loads were answered (a capped explanation may also have met a 503 and waited its Retry-After).
    assert all(" answered/s" in line and "theirs p50 " in line for line in lines[1:]), lines
    # The flood of GET /metrics on the users' port was answered, beside the probe's answers above.
    flood = lines[-1].split("; theirs ")[1]
    assert flood.startswith("p50 ") and "{200: " in flood, flood
    assert float(flood.rsplit(", ", 1)[1].removesuffix(" answered/s")) > 0, flood


@pytest.mark.bench
def test_bench_served_engines_serves_each_engine_and_compares_its_answers(tmp_path):
    # Starts KServe's own model server once per engine (no TorchServe, no wrk: aiohttp clients: points shorter than
    # wrk's 1 s), ~20 s here.
    out = tmp_path / "served.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_served_engines", "--engines", "eager-fp32",
                           "openvino-fp32", "--images", "40", "--concurrency", "1", "3", "--duration", "0.5",
                           "--warmup", "0.2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " cores" in done.stdout.splitlines()[0], done.stdout
    import json

    figures = json.loads(out.read_text())
    assert set(figures["engines"]) == {"eager-fp32", "openvino-fp32"}, figures
    for name, entry in figures["engines"].items():
        assert entry["served"] == name and entry["device"] == "cpu", entry  # read from the server's own log
        assert entry["answered"] == 40 and entry["agreement_with_fp32_in_process"] == 1.0, entry  # lossless engines
        for concurrency in (1, 3):
            assert entry[f"concurrency_{concurrency}"]["images_per_s"] > 0, entry
            assert entry[f"concurrency_{concurrency}"]["failed"] == 0, entry
    assert "openvino-fp32 vs eager-fp32: " in done.stdout, done.stdout
