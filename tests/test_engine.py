"""The engine choice and its accuracy guard (handler/engine.py), in-process: no server, no data set.

The guard test quantizes the shipped network for real (PT2E, torchao's x86 inductor quantizer) with
a deliberately damaged calibration, but runs it without inductor's compile (minutes on 2 cores);
the served path compiles the same quantized graph.
"""
from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handler import engine as engines
from handler.engine import serving_model
from model.normalization import normalize
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def record(**entries) -> dict:
    return {"engines": {engines.EAGER: {"top1": 0.75, "agreement": 1.0, "passed": True}, **entries}}


PASSED = {"top1": 0.749, "agreement": 0.995, "passed": True}
FAILED = {"top1": 0.70, "agreement": 0.93, "passed": False}


INT8_PASSED = {**PASSED, "recheck_logit_gap": engines.RECHECK_LOGIT_GAP}


def test_auto_prefers_bf16_with_amx_and_rechecked_int8_elsewhere(monkeypatch):
    both = record(**{"compile-bf16": PASSED, "int8": PASSED, "openvino-bf16": PASSED, "openvino-int8": INT8_PASSED})
    monkeypatch.delenv(engines.ONEDNN_ISA_ENV, raising=False)
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    monkeypatch.setattr(engines, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert engines.machine_kind(CPU) == "amx-bf16"
    assert engines.candidates("auto", CPU, both) == ["openvino-bf16", "compile-bf16", "openvino-fp32", "compile-fp32",
                                                     engines.EAGER]
    # bf16 in AVX-512 without AMX's tiles (AMD Zen 4; or oneDNN capped below AMX): int8 with VNNI was faster.
    without_amx = ["openvino-int8", "openvino-bf16", "compile-bf16", "openvino-fp32", "compile-fp32", engines.EAGER]
    monkeypatch.setenv(engines.ONEDNN_ISA_ENV, "avx512_core_bf16")
    assert engines.machine_kind(CPU) == "avx512-bf16" and engines.candidates("auto", CPU, both) == without_amx
    monkeypatch.delenv(engines.ONEDNN_ISA_ENV)
    monkeypatch.setattr(engines, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "avx512_vnni"})
    assert engines.machine_kind(CPU) == "avx512-bf16" and engines.candidates("auto", CPU, both) == without_amx
    unmeasured_int8 = record(**{"openvino-bf16": PASSED, "compile-bf16": PASSED})
    assert engines.candidates("auto", CPU, unmeasured_int8) == without_amx[1:]
    monkeypatch.setattr(engines, "native_bf16", lambda device: False)
    assert engines.candidates("auto", CPU, both) == ["openvino-int8", "openvino-fp32", "compile-fp32", engines.EAGER]
    # int8 is lossy: without a passing record measured with the handler's recheck rule, the lossless ones
    # (a record of the earlier softmax-probability rule included).
    for entry in (None, FAILED, {**INT8_PASSED, "recheck_logit_gap": engines.RECHECK_LOGIT_GAP / 2},
                  {**PASSED, "recheck_margin": 0.05}):
        other = record(**({"openvino-int8": entry} if entry else {}))
        assert engines.candidates("auto", CPU, other) == ["openvino-fp32", "compile-fp32", engines.EAGER]
    assert "recheck rule" in engines.refusal("openvino-int8", CPU, record(**{"openvino-int8": PASSED}))
    assert "no native bf16" in engines.refusal("compile-bf16", CPU, both)
    assert "no native bf16" in engines.refusal("openvino-bf16", CPU, both)
    # Without the openvino package auto goes on to inductor rather than failing the worker.
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert engines.candidates("auto", CPU, both) == ["compile-bf16", "compile-fp32", engines.EAGER]
    assert "not installed" in engines.refusal("openvino-fp32", CPU, both)
    assert "run on the CPU" in engines.refusal("openvino-fp32", torch.device("cuda"), both)
    assert "run on the CPU" in engines.refusal("openvino-int8", torch.device("cuda"), both)


def test_kserves_predictor_runs_on_the_gpu_it_sees_and_auto_skips_openvino_there(monkeypatch):
    # MOCK: no GPU on this machine (torch.cuda.is_available patched): the device choice and the engines it
    # leads to; the forward pass on a GPU is not run here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.serving_device() == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = engines.serving_device()
    assert gpu == torch.device("cuda", 0)
    both = record(**{"compile-bf16": PASSED, "openvino-bf16": PASSED, "openvino-int8": INT8_PASSED})
    assert engines.candidates("auto", gpu, both) == ["compile-bf16", "compile-fp32", engines.EAGER]


def test_an_engine_that_failed_the_test_split_or_was_never_measured_is_not_served(monkeypatch, caplog):
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        assert engines.candidates("auto", CPU, record(**{"compile-bf16": FAILED})) == ["openvino-fp32", "compile-fp32",
                                                                                        engines.EAGER]
    assert "failed the accuracy guard" in caplog.text and "agreement 0.9300" in caplog.text
    # Lossless engines need no record; lossy ones do. OpenVINO's first: as fast, built in seconds, not ~50.
    assert engines.candidates("auto", CPU, None) == ["openvino-fp32", "compile-fp32", engines.EAGER]
    assert "no accuracy record" in engines.refusal("int8", CPU, None)
    assert engines.candidates("int8", CPU, record(**{"int8": FAILED})) == [engines.EAGER]
    assert "unknown engine" in engines.refusal("tensorrt", CPU, None)


def test_this_machine_is_described_in_the_cache_key():
    key = engines.cache_key("compile-bf16", "ab" * 32, 6, CPU, None)
    assert key != engines.cache_key("compile-bf16", "ab" * 32, 4, CPU, None)  # another batch bound
    assert key != engines.cache_key("compile-fp32", "ab" * 32, 6, CPU, None)
    assert key != engines.cache_key("compile-bf16", "cd" * 32, 6, CPU, None)  # other weights
    with pytest.MonkeyPatch.context() as patch:  # the same weights through changed network code
        patch.setattr(engines, "network_code_sha256", lambda: "0" * 64)
        assert key != engines.cache_key("compile-bf16", "ab" * 32, 6, CPU, None)
    assert engines.machine_description(CPU)["capability"] == torch.backends.cpu.get_cpu_capability()


def test_inductor_packages_are_per_thread_count_and_openvino_ir_is_not(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {name: engines.cache_key(name, "ab" * 32, 6, CPU, None) for name in ("compile-fp32", "openvino-fp32")}
        torch.set_num_threads(2)
        two = {name: engines.cache_key(name, "ab" * 32, 6, CPU, None) for name in ("compile-fp32", "openvino-fp32")}
    finally:
        torch.set_num_threads(threads)
    assert one["compile-fp32"] != two["compile-fp32"]  # inductor writes the thread count into its kernels
    assert one["openvino-fp32"] == two["openvino-fp32"]  # the IR has none: one conversion for every worker


def test_the_cache_key_names_the_converter_that_wrote_the_package(monkeypatch):
    """OpenVINO's converter writes its IR, torchao's quantizer makes int8's graph: another version, another package."""
    def keys():
        return {name: engines.cache_key(name, "ab" * 32, 6, CPU, None) for name in ("compile-fp32", "openvino-fp32", "int8")}

    before = keys()
    monkeypatch.setattr(engines, "_version", lambda distribution: f"{distribution} 99.0")
    after = keys()
    assert after["compile-fp32"] == before["compile-fp32"]  # neither shapes inductor's fp32 package
    assert after["openvino-fp32"] != before["openvino-fp32"] and after["int8"] != before["int8"]


def test_a_capped_onednn_isa_is_another_machine(monkeypatch):
    """ONEDNN_MAX_CPU_ISA (bench_engines --emulate-isa, or an operator's cap) changes the kernels a
    package calls: it must not load one built without the cap."""
    monkeypatch.delenv(engines.ONEDNN_ISA_ENV, raising=False)
    uncapped = engines.cache_key("compile-fp32", "ab" * 32, 6, CPU, None)
    monkeypatch.setenv(engines.ONEDNN_ISA_ENV, "AVX2")
    assert engines.machine_description(CPU)["onednn_max_isa"] == "AVX2"
    assert engines.cache_key("compile-fp32", "ab" * 32, 6, CPU, None) != uncapped
    assert not engines.native_bf16(CPU)  # capped below AVX512_CORE_BF16: bf16 would be emulated
    assert engines.machine_kind(CPU) == "no-bf16"


def test_guard_refuses_int8_with_a_damaged_calibration_and_falls_back_to_fp32(caplog):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    inputs = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    # One flat grey picture to calibrate on; a 128-image probe is plenty to see the damage.
    damaged = {"calibration": torch.zeros_like(inputs["calibration"][:16]), "probe": inputs["probe"][:128]}

    def build_uncompiled(name, model, weights_sha256, max_batch, device, calibration_images, folder, **_):
        return engines.Engine(name, engines._quantized(model, calibration_images))

    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine("int8", model, "test", 6, CPU, record(int8=PASSED), damaged, normalize,
                                       build=build_uncompiled)
    assert served.name == engines.EAGER
    assert "engine int8 refused" in caplog.text and "probe images" in caplog.text


def test_the_cache_key_names_the_thread_count_the_kernels_were_written_for():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engines.cache_key("compile-bf16", "ab" * 32, 6, CPU, None)
        torch.set_num_threads(2)
        assert engines.cache_key("compile-bf16", "ab" * 32, 6, CPU, None) != one
    finally:
        torch.set_num_threads(threads)


def test_the_cache_keeps_the_most_recently_used_packages_and_spares_a_locked_one(tmp_path):
    import fcntl
    import os

    for age, name in enumerate(["newest", "recent", "old", "older", "locked-oldest"]):
        for suffix in (".pt2", ".json", ".lock"):
            (tmp_path / f"compile-bf16-{name}{suffix}").write_text("x")
            os.utime(tmp_path / f"compile-bf16-{name}{suffix}", (1e9 - age * 100, 1e9 - age * 100))
    # A compile killed mid-write left its temporaries; another one is being written now (its entry's lock held).
    writing = "compile-bf16-locked-oldest.456.tmp.pt2"
    for name in ("compile-bf16-gone.123.tmp.pt2", "openvino-fp32-gone.123.tmp.json", writing):
        (tmp_path / name).write_text("x")
    with open(tmp_path / "compile-bf16-locked-oldest.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker is loading it
        removed = engines.prune_cache(tmp_path, keep=2)
    assert sorted(removed) == ["compile-bf16-old", "compile-bf16-older"]
    left = sorted(p.name for p in tmp_path.iterdir())
    # The lock files stay: a worker waiting on the old one and a newcomer opening the name lock the same file.
    kept = [f"compile-bf16-{n}{s}" for n in ("newest", "recent", "locked-oldest") for s in (".pt2", ".json")]
    locks = [f"compile-bf16-{n}.lock" for n in ("newest", "recent", "locked-oldest", "old", "older", "gone")]
    assert left == sorted(kept + locks + ["openvino-fp32-gone.lock", writing])


def test_a_damaged_cache_entry_is_compiled_again_and_served(tmp_path, caplog):
    """A package or record cut short (a full disk, a worker killed while copying) is said once, deleted and
    compiled again under its lock: the engine is served, not eager fp32 for good."""
    pytest.importorskip("openvino")
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    inputs = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    built = engines.build_engine("openvino-fp32", model, "test", 6, CPU, None, tmp_path)
    xml = Path(built.info["path"])
    for damaged, content in ((xml, xml.read_bytes()[:len(xml.read_bytes()) // 2]), (xml.with_suffix(".json"), b"")):
        damaged.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=engines.__name__):
            served = engines.select_engine("openvino-fp32", model, "test", 6, CPU, None, inputs, normalize,
                                           folder=tmp_path)
        assert served.name == "openvino-fp32" and not served.info["cached"], served.info
        said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
        assert len(said) == 1 and xml.stem in said[0], caplog.text
        again = engines.build_engine("openvino-fp32", model, "test", 6, CPU, None, tmp_path)
        assert again.info["cached"] and again.info["path"] == str(xml)
    assert not list(tmp_path.glob("*.tmp.*"))  # the record too was written whole, then renamed


def test_openvino_engines_build_once_load_from_the_cache_and_agree_with_fp32(tmp_path):
    pytest.importorskip("openvino")
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    probe = normalize(engines.load_inputs(SHIPPED_WEIGHTS_DIR)["probe"])
    reference = engines.Engine(engines.EAGER, model)
    expected = reference(probe)
    names = ["openvino-fp32"] + (["openvino-bf16"] if engines.native_bf16(CPU) else [])
    for name in names:
        built = engines.build_engine(name, model, "test", 6, CPU, None, tmp_path)
        loaded = engines.build_engine(name, model, "test", 6, CPU, None, tmp_path)
        assert not built.info["cached"] and loaded.info["cached"], (built.info, loaded.info)
        assert Path(loaded.info["path"]).suffix == ".xml" and Path(loaded.info["path"]).with_suffix(".bin").is_file()
        # Any batch: 1..6 in one call, the 256 of the probe in chunks of 6; the answers are fp32's.
        for batch in (probe[:1], probe[:6], probe):
            assert loaded(batch).shape == (len(batch), 100) and loaded(batch).dtype == torch.float32
        assert engines.probe_agreement(loaded, expected.argmax(1), probe) >= engines.PROBE_MIN_AGREEMENT
        if name == "openvino-fp32":
            torch.testing.assert_close(loaded(probe), expected, rtol=1e-3, atol=1e-3)
    # prune_cache removes an IR's .xml and .bin with its record.
    assert len(engines.prune_cache(tmp_path, keep=1)) == len(names) - 1
    assert len(list(tmp_path.glob("*.xml"))) == len(list(tmp_path.glob("*.bin"))) == len(list(tmp_path.glob("*.json"))) == 1


def test_building_an_openvino_engine_sends_no_telemetry_and_forks_nothing(tmp_path):
    """ov.convert_model sent usage events to Google Analytics, each from a process forked off the worker (23 seen
    during one conversion here; in KServe's model server, with grpc loaded, a forked child crashed): handler/engine.py
    makes the telemetry package unimportable, so OpenVINO's converter and NNCF use their stubs. In a fresh process."""
    pytest.importorskip("openvino")
    script = f"""
import threading, time, psutil, torch
from handler import engine as engines
seen, stop = set(), []
def watch():
    while not stop:
        seen.update(child.pid for child in psutil.Process().children(recursive=True))
        time.sleep(0.005)
watcher = threading.Thread(target=watch)
watcher.start()
model = engines.serving_model(torch.load({str(SHIPPED_WEIGHTS)!r}, map_location="cpu", weights_only=True))
engines.build_engine("openvino-fp32", model, "test", 6, torch.device("cpu"), None, __import__("pathlib").Path({str(tmp_path)!r}))
time.sleep(0.5)
stop.append(True)
watcher.join()
from openvino.tools.ovc import telemetry_utils
print(len(seen), telemetry_utils.tm.__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["0", "openvino.tools.ovc.telemetry_stub"], done.stdout


def test_the_engine_bound_is_the_batch_doubled_with_flip_tta():
    assert engines.images_per_forward({"batchSize": 6}) == 6
    assert engines.images_per_forward({"batchSize": 6, "handler": {"flip_tta": False}}) == 6
    assert engines.images_per_forward({"batchSize": 6, "handler": {"flip_tta": True}}) == 12  # image + mirror


def test_a_lone_image_borrows_an_idle_neighbours_share_of_the_cores_unless_pinned(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(engines.os, "cpu_count", lambda: 2)
    two_workers = {"minWorkers": 2}
    assert engines.worker_threads(two_workers) == 1 and engines.lone_image_threads(two_workers) == 2
    # A worker that has every core already, pinned threads, or the setting at 0: no more than its own.
    assert engines.lone_image_threads({"minWorkers": 1}) == 2 == engines.worker_threads({"minWorkers": 1})
    assert engines.lone_image_threads({"minWorkers": 2, "handler": {"cpu_threads": 1}}) == 1
    assert engines.lone_image_threads({"minWorkers": 2, "handler": {"lone_image_threads": 0}}) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert engines.lone_image_threads(two_workers) == 1
    # Said explicitly, it is what the operator asked (here more than the cores: an operator's choice).
    assert engines.lone_image_threads({"minWorkers": 2, "handler": {"lone_image_threads": 4}}) == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(engines.os, "cpu_count", lambda: 16)
    assert engines.lone_image_threads(two_workers) == 16 and engines.lone_image_threads({"minWorkers": 4}) == 8


def test_openvino_runs_a_lone_image_on_the_lent_threads_and_batches_on_its_own(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    sha = hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    probe = normalize(engines.load_inputs(SHIPPED_WEIGHTS_DIR)["probe"][:12])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # a 1-thread worker, as served on 2 cores
    engine = engines.build_engine("openvino-int8", model, sha, 6, CPU, None, tmp_path, shipped_dir=SHIPPED_WEIGHTS_DIR)
    parts = engine.forward.fast, engine.forward.exact  # int8 and its fp32 rechecks

    def answers():
        return ([torch.cat([part(image, lone=True) for image in probe.split(1)]) for part in parts]
                + [part(probe[:6]) for part in parts])

    before = answers()
    top2 = parts[0](probe[:6]).topk(2, dim=1).values
    one_close_call = float((top2[:, 0] - top2[:, 1]).sort().values[:2].mean())  # a gap that rechecks 1 of the 6
    engine.lend_threads(2, rows=1)
    assert engine.info["lone_image_threads"] == 2
    for part in parts:
        assert part.request.get_compiled_model().get_property("INFERENCE_NUM_THREADS") == 1
        assert part._lone_request.get_compiled_model().get_property("INFERENCE_NUM_THREADS") == 2
    used = []

    class Counted:  # which compiled model answered (int8's or fp32's, own or lent threads), and how many rows
        def __init__(self, part, name):
            self.name, self.request = f"{part} {name}", getattr(getattr(engine.forward, part), name)

        def infer(self, inputs):
            used.append((self.name, len(inputs[0])))
            return self.request.infer(inputs)

    for part in ("fast", "exact"):
        for name in ("request", "_lone_request"):
            monkeypatch.setattr(getattr(engine.forward, part), name, Counted(part, name))
    for image in probe.split(1):
        engine(image)
    engine(probe[:6])
    engine(probe[:7])  # two chunks, 6 rows and 1: a batch of 7 is no lone image, its last row neither
    assert [u for u in used if u[0].startswith("fast")] == \
        [("fast _lone_request", 1)] * len(probe) + [("fast request", 6), ("fast request", 6), ("fast request", 1)]
    # Close calls are rechecked on the threads of the batch they came from: a lone image's on the lent ones,
    # the one close call of a batch of 6 on the worker's own.
    used.clear()
    monkeypatch.setattr(engine.forward, "gap", float("inf"))
    engine(probe[:1])
    monkeypatch.setattr(engine.forward, "gap", one_close_call)
    engine(probe[:6])
    assert used == [("fast _lone_request", 1), ("exact _lone_request", 1), ("fast request", 6), ("exact request", 1)]
    monkeypatch.undo()
    # The same networks on more threads: the same logits up to float rounding.
    after = answers()
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-4)
    # No more threads than it has already (its own count, or fewer): nothing to lend, nothing said.
    fp32 = engines.build_engine("openvino-fp32", model, sha, 6, CPU, None, tmp_path)
    fp32.lend_threads(torch.get_num_threads(), rows=1)
    fp32.lend_threads(1, rows=1)
    assert "lone_image_threads" not in fp32.info and fp32.forward._lone_request is None and fp32.lone_rows == 0


def test_openvino_int8_answers_close_calls_with_fp32():
    int8_logits = torch.zeros(5, 100)
    int8_logits[0, 0] = 6.0                          # sure: int8's answer stands
    int8_logits[1, :2] = torch.tensor([1.0, 1.001])  # a close call: fp32 answers it
    int8_logits[2, 1:3] = torch.tensor([3.0, 9.0])   # sure
    int8_logits[3, [0, 2]] = 2.0                     # a tie: fp32 answers it
    # Two logits 0.5 apart among 98 others: their softmax probabilities differ by only 0.01, yet the gap is
    # twice what int8's rounding moves a logit: int8's answer stands (the earlier probability rule asked fp32).
    int8_logits[4, :2] = torch.tensor([1.0, 0.5])
    asked = []

    def fp32(images, lone=False):
        asked.append(images.clone())
        return torch.full((len(images), 100), -1.0)

    forward = engines._RecheckedForward(lambda images, lone=False: int8_logits[images.long().flatten()], fp32, gap=0.25)
    images = torch.arange(5.0).view(5, 1)
    logits = forward(images)
    assert [batch.flatten().tolist() for batch in asked] == [[1.0, 3.0]]  # only the close calls, in one call
    torch.testing.assert_close(logits[[0, 2, 4]], int8_logits[[0, 2, 4]])
    assert (logits[[1, 3]] == -1.0).all()
    assert (forward.answered, forward.rechecked) == (5, 2)
    forward(images[[0, 2, 4, 0]])  # a batch with no close call asks fp32 nothing more
    assert len(asked) == 1 and (forward.answered, forward.rechecked) == (9, 2)


def test_openvino_int8_serves_the_shipped_network_and_refuses_one_made_for_other_weights(tmp_path, caplog):
    pytest.importorskip("openvino")
    sha = hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    # Random training images (the shipped probe is all close calls: most of it is rechecked).
    probe = normalize(engines.load_inputs(SHIPPED_WEIGHTS_DIR)["calibration"])
    expected = engines.Engine(engines.EAGER, model)(probe)
    engine = engines.build_engine("openvino-int8", model, sha, 6, CPU, None, tmp_path, shipped_dir=SHIPPED_WEIGHTS_DIR)
    logits = engine(probe)
    assert logits.shape == (len(probe), 100) and engine.forward.answered == len(probe)
    assert 0 < engine.forward.rechecked < len(probe) / 4  # some close calls, not most answers
    assert engines.probe_agreement(engine, expected.argmax(1), probe) >= engines.PROBE_MIN_AGREEMENT
    # The rechecked images carry fp32's logits; the others int8's own, which differ from fp32's.
    fp32_like = torch.isclose(logits, expected, rtol=1e-3, atol=1e-3).all(1)
    assert 0 < int(fp32_like.sum()) < len(probe) / 2
    # Other weights (a retrained network without `python -m training.quantize`), or no int8 network at all:
    # refused with a line saying what to run, and the worker serves the next candidate.
    with pytest.raises(engines.EngineError, match="other weights"):
        engines.build_engine("openvino-int8", model, "0" * 64, 6, CPU, None, tmp_path, shipped_dir=SHIPPED_WEIGHTS_DIR)
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        served = engines.select_engine("openvino-int8", model, sha, 6, CPU, record(**{"openvino-int8": INT8_PASSED}),
                                       None, normalize, folder=tmp_path, shipped_dir=tmp_path)
    assert served.name == engines.EAGER
    assert "engine openvino-int8 not served: no int8 network" in caplog.text and "training.quantize" in caplog.text


def test_quantize_writes_an_int8_network_named_for_its_weights_that_the_archive_packs(tmp_path, nncf_cpu_extension):
    pytest.importorskip("nncf")
    from serving.archive import int8_network_for, package_files
    from serving.settings import ENGINE_INT8_FILE
    from training.quantize import quantize

    weights = tmp_path / "CIFAR100_model.pth"
    weights.write_bytes(SHIPPED_WEIGHTS.read_bytes())
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model = serving_model(state_dict)
    images = engines.load_inputs(SHIPPED_WEIGHTS_DIR)["probe"]
    probe = normalize(images, channels_last=False)
    # Few images and steps: this checks the tool and its file, not the quality (the shipped network's is in
    # engines.json).
    summary = quantize(state_dict, sha, probe[:16], probe[16:40], images, tmp_path / ENGINE_INT8_FILE, steps=2,
                       batch=8, progress=False, log=lambda line: None)
    assert summary["weights_sha256"] == sha and summary["quantizers"] > 0 and summary["qat_steps"] == 2
    # The stem and the SE gates stay float32 (their inputs are not quantized), the other layers are int8.
    import openvino as ov

    network = ov.Core().read_model(str(tmp_path / ENGINE_INT8_FILE))
    inputs = {op.get_friendly_name(): op.input(0).get_source_output().get_node().get_type_name()
              for op in network.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")}
    stem, gates = [n for n in inputs if ".stem." in n], [n for n in inputs if ".se." in n]
    rest = [n for n in inputs if n not in stem + gates]
    assert len(stem) == 1 and len(gates) == 12 and len(rest) == 16
    assert all(inputs[n] != "FakeQuantize" for n in stem + gates) and all(inputs[n] == "FakeQuantize" for n in rest)
    assert int8_network_for(weights) == tmp_path / ENGINE_INT8_FILE
    assert (tmp_path / ENGINE_INT8_FILE, ENGINE_INT8_FILE) in package_files(weights)
    assert (tmp_path / "engine_int8.bin", "engine_int8.bin") in package_files(weights)
    engine = engines.build_engine("openvino-int8", model, sha, 6, CPU, None, tmp_path, shipped_dir=tmp_path)
    assert engine(probe[:7]).argmax(1).tolist()  # builds and answers any batch
    # Other weights beside it: the archive leaves the int8 network out.
    weights.write_bytes(SHIPPED_WEIGHTS.read_bytes() + b"\0")
    assert int8_network_for(weights) is None
    assert all(dest != ENGINE_INT8_FILE for _, dest in package_files(weights))


def test_the_network_quantize_trains_computes_what_the_handler_serves():
    from training.quantize import folded_network

    state_dict = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    images = normalize(engines.load_inputs(SHIPPED_WEIGHTS_DIR)["probe"][:32], channels_last=False)
    folded = folded_network(state_dict)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert next(folded.parameters()).is_contiguous()  # NCHW, as NNCF and OpenVINO's trace take it
    with torch.no_grad():
        torch.testing.assert_close(folded(images), serving_model(state_dict)(images), atol=1e-4, rtol=1e-4)


def test_a_record_rerun_on_another_machine_keeps_what_it_skipped_saying_where_it_was_measured():
    from training.engines import kept_entries

    xeon = {"device": "cpu", "capability": "AVX512", "flags": ["amx_bf16", "avx512_bf16"]}
    old = {"weights_sha256": "abc", "date": "2026-11-30", "machine": xeon,
           "engines": {"openvino-bf16": PASSED, "openvino-int8": {**INT8_PASSED, "measured_on": {"date": "d", "machine": {}}}}}
    kept = kept_entries(old, "abc")
    # An entry without its own stamp was measured where the old record says; one with a stamp keeps it.
    assert kept["openvino-bf16"] == {**PASSED, "measured_on": {"date": "2026-11-30", "machine": xeon}}
    assert kept["openvino-int8"]["measured_on"] == {"date": "d", "machine": {}}
    assert kept_entries(old, "other weights") == {}  # another network's figures say nothing about these


def test_the_start_probe_serves_an_engine_at_its_agreement_line_and_refuses_one_below(caplog):
    """PROBE_MIN_AGREEMENT's line, on the shipped probe: a lossy engine (it needs a record) that changes fp32's
    top-1 on 15% of it is served, one that changes 15.5% is refused with a line saying so and the worker serves
    eager fp32. The damaged engine is the real network whose first rows' logits are shifted by one class. For
    other weights the probe is no close calls of theirs: the line is OTHER_PROBE_MIN_AGREEMENT."""
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    inputs = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    shipped = {"calibration": inputs["calibration"][:8], "probe": inputs["probe"][:200],
               "probe_weights_sha256": inputs["probe_weights_sha256"]}
    sha = hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()

    def changing(rows: int):
        def build(name, model, weights_sha256, max_batch, device, calibration_images, folder, **_):
            def forward(images):
                logits = model(images)
                logits[:rows] = logits[:rows].roll(1, dims=1)  # another top-1 on the first `rows` images
                return logits
            return engines.Engine(name, forward)
        return build

    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine("int8", model, sha, 6, CPU, record(int8=PASSED), shipped, normalize,
                                       build=changing(30))
    assert served.name == "int8" and served.info["probe_agreement"] == 0.85
    assert "refused" not in caplog.text
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine("int8", model, sha, 6, CPU, record(int8=PASSED), shipped, normalize,
                                       build=changing(31))
    assert served.name == engines.EAGER
    assert "engine int8 refused: it agrees with fp32 on 84.5% of the 200 probe images (needs 85%)" in caplog.text
    other = {"record": record(int8=PASSED), "inputs": shipped, "normalize": normalize}
    assert engines.select_engine("int8", model, "other weights", 6, CPU, build=changing(6), **other).name == "int8"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine("int8", model, "other weights", 6, CPU, build=changing(7), **other)
    assert served.name == engines.EAGER
    assert "engine int8 refused: it agrees with fp32 on 96.5% of the 200 probe images (needs 97%)" in caplog.text


def test_a_lossless_engine_whose_logits_moved_is_refused_though_its_answers_stand(caplog):
    """LOSSLESS_MAX_LOGIT_CHANGE: compile-fp32 or openvino-fp32 must give fp32's logits up to float rounding, so
    one that adds 0.05 to every logit (top-1 unchanged on every image: a wrong constant, a bad fusion) is
    refused; 1e-4, served. New weights without a record get these engines, checked against eager at start."""
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    inputs = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    shipped = {"calibration": inputs["calibration"][:8], "probe": inputs["probe"][:64]}

    def shifted(by: float):
        def build(name, model, weights_sha256, max_batch, device, calibration_images, folder, **_):
            return engines.Engine(name, lambda images: model(images) + by)  # no answer, nor probability, moves
        return build

    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine("compile-fp32", model, "test", 6, CPU, None, shipped, normalize,
                                       build=shifted(1e-4))
    assert served.name == "compile-fp32" and served.info["probe_agreement"] == 1.0
    assert 0 < served.info["probe_max_logit_change"] <= 1e-4 and "refused" not in caplog.text
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine("compile-fp32", model, "test", 6, CPU, None, shipped, normalize,
                                       build=shifted(0.05))
    assert served.name == engines.EAGER
    assert "engine compile-fp32 refused: its logits differ from fp32's by up to 0.0" in caplog.text


def test_the_shipped_probe_refuses_openvino_int8_without_its_rechecks_which_random_images_would_pass(tmp_path, caplog):
    """The probe is fp32's closest calls (training/engines.py), where a lossy engine's answers move first: the
    shipped int8 network without its fp32 rechecks (98.6% agreement on the test split, under the guard's 99%)
    is refused there, while on random training images (the shipped calibration ones) it agrees on 97% or more;
    with its rechecks it is served."""
    pytest.importorskip("openvino")
    sha = hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    inputs = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    shipped_record = engines.load_record(SHIPPED_WEIGHTS_DIR)
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine(engines.OPENVINO_INT8, model, sha, 6, CPU, shipped_record, inputs, normalize,
                                       folder=tmp_path, shipped_dir=SHIPPED_WEIGHTS_DIR)
    assert served.name == engines.OPENVINO_INT8 and served.info["probe_agreement"] >= engines.PROBE_MIN_AGREEMENT
    alone = served.forward.fast  # the int8 network's own answers

    def build_alone(name, *_, **__):
        return engines.Engine(name, alone, 6, {}, torch.contiguous_format)

    random_images = normalize(inputs["calibration"])
    assert engines.probe_agreement(engines.Engine("int8 alone", alone, 6, {}, torch.contiguous_format),
                                   engines.Engine(engines.EAGER, model), random_images) >= 0.97
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        served = engines.select_engine(engines.OPENVINO_INT8, model, sha, 6, CPU, shipped_record, inputs, normalize,
                                       folder=tmp_path, shipped_dir=SHIPPED_WEIGHTS_DIR, build=build_alone)
    assert served.name == engines.EAGER and "engine openvino-int8 refused: it agrees with fp32 on" in caplog.text


def test_the_record_fails_an_engine_beyond_either_limit_of_the_guard():
    """training/engines.py's pass/fail (MAX_TOP1_DROP, MIN_AGREEMENT): on 1,000 images where fp32 is right on
    800, an engine 0.1 point under fp32 with 99.1% agreement passes, and so does one exactly at either limit;
    0.3 point under (agreement 99.7%), or at fp32's top-1 but agreeing on only 98.9%, fails."""
    from training.engines import measure

    n, classes = 1000, 100
    labels = torch.arange(n) % classes
    answers = torch.where(torch.arange(n) < 800, labels, (labels + 1) % classes)  # fp32: 80.0% top-1

    def logits_of(top1: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(n, classes)
        logits[torch.arange(n), top1] = 5.0
        return logits

    def engine(right_to_wrong: int, wrong_to_other_wrong: int) -> dict:
        top1 = answers.clone()
        top1[:right_to_wrong] = (labels[:right_to_wrong] + 2) % classes      # were right: now wrong
        top1[800:800 + wrong_to_other_wrong] = (labels[800:800 + wrong_to_other_wrong] + 2) % classes  # wrong either way
        return measure("int8", logits_of(top1), logits_of(answers), labels, None, {})

    within = engine(right_to_wrong=1, wrong_to_other_wrong=8)
    assert (within["top1"], within["agreement"], within["passed"]) == (0.799, 0.991, True)
    lower = engine(right_to_wrong=3, wrong_to_other_wrong=0)
    assert (lower["top1"], lower["agreement"], lower["passed"]) == (0.797, 0.997, False)
    disagreeing = engine(right_to_wrong=0, wrong_to_other_wrong=11)
    assert (disagreeing["top1"], disagreeing["agreement"], disagreeing["passed"]) == (0.8, 0.989, False)
    # Exactly at either limit passes (float rounding must not push it over).
    at_drop, at_agreement = engine(right_to_wrong=2, wrong_to_other_wrong=0), engine(0, 10)
    assert (at_drop["top1"], at_drop["agreement"], at_drop["passed"]) == (0.798, 0.998, True)
    assert (at_agreement["top1"], at_agreement["agreement"], at_agreement["passed"]) == (0.8, 0.99, True)


def test_the_shipped_record_lets_the_handler_serve_openvino_int8_on_a_cpu_without_native_bf16(monkeypatch):
    """The shipped engines.json was measured with the handler's recheck rule: without native bf16, auto's first
    choice is openvino-int8, as the README says (a RECHECK_LOGIT_GAP changed without re-running
    python -m training.engines would quietly serve openvino-fp32 instead)."""
    pytest.importorskip("openvino")
    shipped = engines.load_record(SHIPPED_WEIGHTS_DIR)
    assert shipped["engines"][engines.OPENVINO_INT8]["recheck_logit_gap"] == engines.RECHECK_LOGIT_GAP
    monkeypatch.setattr(engines, "native_bf16", lambda device: False)
    # ... of the int8 network shipped beside it (engine_int8.xml + .bin, committed with it)
    assert engines.candidates("auto", CPU, shipped, SHIPPED_WEIGHTS_DIR)[0] == engines.OPENVINO_INT8


def test_openvino_int8_is_refused_when_its_network_is_not_the_one_the_record_measured(tmp_path, monkeypatch, caplog):
    """A network made anew (python -m training.quantize, same weights) carries no figures: the record's pass and
    calibration refit were another network's, so the worker serves the next candidate and says why."""
    monkeypatch.setattr(engines, "native_bf16", lambda device: False)
    monkeypatch.setattr(engines, "openvino_installed", lambda: True)
    (tmp_path / engines.INT8_FILE).write_text("<net/>")
    (tmp_path / engines.INT8_FILE).with_suffix(".bin").write_bytes(b"weights")
    measured = engines.int8_network_sha256(tmp_path / engines.INT8_FILE)
    assert len(measured) == 64
    assert engines.candidates("auto", CPU, record(**{"openvino-int8": {**INT8_PASSED, "network_sha256": measured}}),
                              tmp_path)[0] == engines.OPENVINO_INT8
    (tmp_path / engines.INT8_FILE).with_suffix(".bin").write_bytes(b"weights made anew")
    assert engines.int8_network_sha256(tmp_path / engines.INT8_FILE) != measured  # the .bin counts too
    for entry in ({**INT8_PASSED, "network_sha256": measured}, INT8_PASSED):  # another network, or none named
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=engines.__name__):
            assert engines.candidates("auto", CPU, record(**{"openvino-int8": entry}), tmp_path)[0] == "openvino-fp32"
        assert "engine openvino-int8 not served: its record measured another int8 network" in caplog.text
    # The archive says so when it is built (it packs the record and the network as they are).
    import json

    from serving.archive import int8_record_warning
    from serving.cli import module_command

    weights = tmp_path / "CIFAR100_model.pth"
    weights.write_bytes(SHIPPED_WEIGHTS.read_bytes())
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    rt_info = f'<rt_info><cifar100><weights_sha256 value="{sha}"/></cifar100></rt_info>'  # made for these weights
    (tmp_path / engines.INT8_FILE).write_text(f"<net>{rt_info}</net>")
    for digest, warned in ((engines.int8_network_sha256(tmp_path / engines.INT8_FILE), False), (measured, True)):
        (tmp_path / engines.RECORD_FILE).write_text(json.dumps(
            {"weights_sha256": sha, **record(**{"openvino-int8": {**INT8_PASSED, "network_sha256": digest}})}))
        assert (int8_record_warning(weights) is not None) == warned
    assert "openvino-int8 will not be served" in int8_record_warning(weights)
    assert f"`{module_command('training.engines', weights)}` measures it" in int8_record_warning(weights)  # not python's


def test_gpu_packages_are_shared_by_every_thread_count(monkeypatch):
    # MOCK: the GPU's name is patched (no GPU here): GPU kernels hold no CPU thread count, so two GPU workers
    # with different torch thread counts load one package instead of compiling two.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    gpu = torch.device("cuda", 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engines.cache_key("compile-bf16", "ab" * 32, 6, gpu, None)
        torch.set_num_threads(2)
        assert engines.cache_key("compile-bf16", "ab" * 32, 6, gpu, None) == one
    finally:
        torch.set_num_threads(threads)
    assert one != engines.cache_key("compile-bf16", "ab" * 32, 6, CPU, None)


def test_a_gpu_worker_serves_no_lossy_engine_on_the_cpus_record_and_the_reverse(monkeypatch, caplog):
    """The archive's engines.json is the CPUs' record: a GPU worker took compile-bf16 (and its calibration refit) on
    figures a CPU's oneDNN rounding made. A lossy engine needs figures from its own kind of machine; lossless ones
    need none. (Only the engine's choice is checked: no GPU runs here.)"""
    gpu = torch.device("cuda", 0)
    shipped = engines.load_record(SHIPPED_WEIGHTS_DIR)
    assert shipped["engines"]["compile-bf16"]["measured_on"]["machine"]["device"] == "cpu"
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        assert engines.candidates("auto", gpu, shipped) == ["compile-fp32", engines.EAGER]
    assert "engine compile-bf16 not served: its accuracy record (engines.json) was measured on a CPU, not on this GPU" \
        in caplog.text
    on_a_gpu = {**PASSED, "measured_on": {"machine": {"device": "NVIDIA H200"}}}
    assert engines.candidates("auto", gpu, record(**{"compile-bf16": on_a_gpu}))[0] == "compile-bf16"
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)  # a CPU that could run it
    assert engines.refusal("compile-bf16", CPU, record(**{"compile-bf16": on_a_gpu})) == \
        "its accuracy record (engines.json) was measured on NVIDIA H200, not on this CPU"
    assert engines.refusal("compile-bf16", CPU, record(**{"compile-bf16": PASSED})) is None  # no machine named


def test_the_probe_is_fp32s_closest_calls_outside_the_calibration_images_above_the_tie_floor(monkeypatch):
    """training/engines.py's pick: the smallest gaps between fp32's two largest logits, closest first, none under
    PROBE_MIN_LOGIT_GAP (a tie float rounding breaks) nor among the calibration images (kept when given)."""
    from training import engines as measuring

    monkeypatch.setattr(engines, "PROBE_IMAGES", 3)
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 32, 32).clone()
    gaps = torch.tensor([0.5, 0.001, 0.03, 0.04, 0.9, 0.025, 0.2, 0.3])  # image 5 is a calibration image below
    logits = torch.zeros(8, 100)
    logits[:, 0] = 5.0
    logits[:, 1] = 5.0 - gaps
    inputs = measuring.training_inputs(images, logits, "ab" * 32, calibration=images[[5, 7]].clone())
    assert inputs["probe"][:, 0, 0, 0].tolist() == [2, 3, 6]  # 1: a tie; 5: calibration; then by gap
    assert inputs["calibration"][:, 0, 0, 0].tolist() == [5, 7] and inputs["probe_weights_sha256"] == "ab" * 32
    drawn = measuring.training_inputs(images, logits, "ab" * 32)["calibration"]  # no file yet: a random draw
    assert len(drawn) == min(measuring.CALIBRATION_IMAGES, len(images))


def test_training_engines_picks_the_probe_again_for_other_weights_and_keeps_the_calibration(tmp_path, monkeypatch):
    """engine_inputs.pt beside the weights: a probe picked for other weights is picked anew (fp32's closest calls
    of these), its calibration images kept, and written whole; for the same weights the file is used as it is."""
    import training.data
    from training.engines import probe_inputs

    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    shipped = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    training_split = torch.cat([shipped["calibration"][:64], shipped["probe"][:64]])
    monkeypatch.setattr(engines, "PROBE_IMAGES", 16)
    monkeypatch.setattr(training.data, "load_split", lambda data_dir, train: (training_split, None))
    path = tmp_path / engines.INPUTS_FILE
    old = {"calibration": shipped["calibration"][:8], "probe": shipped["calibration"][8:24],
           "probe_weights_sha256": "old"}
    torch.save(old, path)
    picked = probe_inputs(path, model, "new", "data", CPU)
    assert picked["probe_weights_sha256"] == "new" and torch.equal(picked["calibration"], old["calibration"])
    # The 16 closest calls of 128 images, half of them the shipped probe's: those are the closer ones.
    rows = {image.numpy().tobytes() for image in shipped["probe"][:64]}
    assert len(picked["probe"]) == 16 and all(image.numpy().tobytes() in rows for image in picked["probe"])
    assert torch.equal(torch.load(path, weights_only=True)["probe"], picked["probe"])
    assert len(list(tmp_path.iterdir())) == 1  # no partial file left
    monkeypatch.setattr(training.data, "load_split", lambda data_dir, train: pytest.fail("the probe was picked again"))
    assert torch.equal(probe_inputs(path, model, "new", "data", CPU)["probe"], picked["probe"])


def test_the_shipped_probe_record_and_weights_belong_together():
    """engine_inputs.pt's probe was picked for the shipped weights, engines.json's fp32 answers are of that probe
    and those weights, and eager fp32 gives them here (else every worker would check its engine against another
    network's answers, or hold a probe of other weights to the looser line)."""
    sha = hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()
    inputs, shipped = engines.load_inputs(SHIPPED_WEIGHTS_DIR), engines.load_record(SHIPPED_WEIGHTS_DIR)
    assert inputs["probe_weights_sha256"] == shipped["weights_sha256"] == sha
    assert shipped["probe_sha256"] == engines.probe_sha256(inputs["probe"]) and len(inputs["probe"]) == engines.PROBE_IMAGES
    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    assert engines.Engine(engines.EAGER, model)(normalize(inputs["probe"])).argmax(1).tolist() == shipped["probe_fp32_top1"]


def test_the_readme_and_the_model_card_quote_the_shipped_record():
    """The served engines' figures the READMEs give are engines.json's: they had kept an earlier record's (another
    CPU's) after it was measured again."""
    import re

    measured = engines.load_record(SHIPPED_WEIGHTS_DIR)["engines"]
    percent = {name: f"{100 * measured[name]['top1']:.2f}%" for name in ("openvino-bf16", "openvino-int8")}
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"{percent['openvino-bf16']} top-1 through `openvino-bf16`" in readme, percent
    assert f"{percent['openvino-int8']} through `openvino-int8`" in readme, percent
    card = " ".join((SHIPPED_WEIGHTS_DIR.parent / "README.md").read_text().split())
    stated = re.search(r"`openvino-bf16` ([\d.]+%) and `openvino-int8` ([\d.]+%) in `engines.json`", card)
    assert stated and stated.groups() == (percent["openvino-bf16"], percent["openvino-int8"]), percent
    int8 = f"{100 * measured['int8']['agreement']:.2f}% agreement in the shipped record"
    assert int8 in readme, int8


def test_with_flip_tta_a_lossy_engine_needs_the_guard_passed_with_flip_tta_too(caplog, monkeypatch):
    """The average of two views can move where neither view did: with openvino-int8's rechecks decided per view it
    agreed with fp32's flip TTA on 98.90% of the test split (under the guard's 99%). With handler.flip_tta on, a lossy
    engine whose record has no flip-TTA figures or failed them is not served (and says why); the lossless ones need
    none; with flip TTA off nothing changes."""
    tta_failed = {**INT8_PASSED, "flip_tta": {"top1": 0.7615, "agreement": 0.989, "images": 10000, "passed": False}}
    tta_passed = {**INT8_PASSED, "flip_tta": {"top1": 0.7615, "agreement": 0.995, "images": 10000, "passed": True}}
    bf16_record = record(**{"openvino-bf16": PASSED})
    # A CPU that could run bf16: on one without (an AVX2-only EPYC), that refusal came first and CI failed there.
    monkeypatch.setattr(engines, "native_bf16", lambda device: True)
    assert "no accuracy record for it with flip TTA" in engines.refusal("openvino-bf16", CPU, bf16_record, flip_tta=True)
    assert engines.refusal("openvino-bf16", CPU, bf16_record) is None
    why = engines.refusal("openvino-int8", CPU, record(**{"openvino-int8": tta_failed}), flip_tta=True)
    assert why == ("it failed the accuracy guard with flip TTA on (engines.json: top-1 0.7615, agreement with fp32's "
                   "flip TTA 0.9890; limits: 0.2 points, 99%)")
    assert engines.refusal("openvino-int8", CPU, record(**{"openvino-int8": tta_passed}), flip_tta=True) is None
    assert engines.refusal("openvino-fp32", CPU, None, flip_tta=True) is None
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        assert engines.candidates("openvino-int8", CPU, record(**{"openvino-int8": tta_failed}),
                                  flip_tta=True) == [engines.EAGER]
    assert "engine openvino-int8 not served: it failed the accuracy guard with flip TTA on" in caplog.text


def test_training_engines_measures_flip_tta_as_the_handler_answers():
    """engine_logits(flip_tta=True): Engine.answer's logits with flip TTA (the mean of each image's and its mirror's
    for eager fp32), for images split across chunks."""
    from model.tta import flip_tta_logits
    from training.engines import engine_logits

    model = serving_model(torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True))
    eager = engines.Engine(engines.EAGER, model)
    images = engines.load_inputs(SHIPPED_WEIGHTS_DIR)["calibration"][:10]
    tta = engine_logits(eager, images, chunk=6, flip_tta=True)
    torch.testing.assert_close(tta, flip_tta_logits(eager, normalize(images)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tta, engine_logits(eager, images), atol=1e-3)  # the mirrors changed something


def test_with_flip_tta_openvino_int8_rechecks_the_close_calls_of_the_averaged_logits():
    """Engine.answer with flip TTA on a rechecked forward: an image whose two views are each clear (gaps 1.0 and
    0.95, opposite classes) but whose average is a close call (0.025) is answered by fp32 (both views); a clear
    image is not; the counts are of views. Per view, nobody would have rechecked it."""
    def fast(images, lone=False):  # class 0 when the image's left column is dark, class 1 when it is bright
        logits = torch.zeros(len(images), 100)
        bright = images[:, 0, 0, 0] > 0.5
        logits[~bright, 0], logits[bright, 1] = 1.0, 0.95
        logits[:, 2] = torch.where(images[:, 0, 0, -1] == images[:, 0, 0, 0], 3.0, 0.0)  # a flat image: class 2
        return logits

    asked = []

    def exact(images, lone=False):
        asked.append(len(images))
        return torch.full((len(images), 100), -1.0)

    forward = engines._RecheckedForward(fast, exact)
    engine = engines.Engine(engines.OPENVINO_INT8, forward, 6, {}, torch.contiguous_format)
    half = torch.zeros(1, 3, 32, 32)
    half[..., 16:] = 1.0  # dark left, bright right: its mirror is the other way round
    flat = torch.ones(1, 3, 32, 32)
    logits, views, rechecked = engine.answer(torch.cat([half, flat]), flip_tta=True)
    assert asked == [2] and (logits[0] == -1.0).all()  # both views of the close call, in one call
    assert int(logits[1].argmax()) == 2 and (views, rechecked) == (4, 2)
    assert (forward.answered, forward.rechecked) == (4, 2)
    plain = engine(torch.cat([half, half.flip(3)]))  # each view alone is clear: no recheck
    assert asked == [2] and plain.argmax(1).tolist() == [0, 1]


def test_the_engine_probe_benchmark_prints_each_engine_beside_the_broken_ones(cifar100_data_dir, capsys):
    """benchmarks/engine_probe.py (RESULTS.md session 48's table) on a few test images: openvino-fp32 agrees
    everywhere, openvino-int8 without its rechecks falls under the probe's line only on the probe."""
    pytest.importorskip("openvino")
    from benchmarks import engine_probe

    assert engine_probe.main(["--data-dir", str(cifar100_data_dir), "--images", "40", "--noise", "0.3",
                              "--engines", "openvino-fp32", "openvino-int8"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["openvino-fp32"][:3] == ["100.00%"] * 3 and float(rows["openvino-fp32"][3]) < 1e-3
    alone = rows["openvino-int8 without its rechecks"]
    assert float(alone[2].rstrip("%")) < 100 * engines.PROBE_MIN_AGREEMENT <= float(alone[1].rstrip("%"))
    assert set(rows) == {"engine", "openvino-fp32", "openvino-int8", "openvino-int8 without its rechecks",
                         "eager + noise 0.3"}
