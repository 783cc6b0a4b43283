"""The serving benchmarks' shared options reach the TorchServe they start (benchmarks/bench_serve.py
torchserve_from_arguments) and the KServe bundle bench_kserve serves (bundle_from_arguments): an option a
benchmark accepts and then ignores would measure the wrong thing (bench_serve --running-torchserve, which starts
none, refuses them)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from benchmarks import bench_adapter, bench_photos, bench_serve
from serving.settings import read_model_config


def test_every_torchserve_option_reaches_the_benchmark_torchserve(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bench_serve, "start_benchmark_torchserve", lambda *a, **k: calls.append((a, k)) or "ts")
    parser = argparse.ArgumentParser()
    bench_serve.add_load_arguments(parser)
    parser.add_argument("--flip-tta", choices=["on", "off"])  # bench_adapter's
    args = parser.parse_args(["--weights", "w.pth", "--batch-size", "3", "--max-batch-delay", "7", "--cpu-threads", "1",
                              "--workers", "2", "--engine", "eager-fp32", "--lone-image-threads", "2",
                              "--ts-property", "job_queue_size=9", "--flip-tta", "off"])
    assert bench_serve.torchserve_from_arguments(tmp_path, args) == "ts"
    (a, k), = calls
    assert a == (tmp_path, Path("w.pth"), 3, 7, 1, {"job_queue_size": "9"}, 2, "eager-fp32", False)
    assert k == {"lone_image_threads": 2}

    # Without the options: the repository's settings (None: model-config.yaml's), flip TTA included.
    calls.clear()
    bench_serve.torchserve_from_arguments(tmp_path, bench_serve_args([]))
    (a, k), = calls
    assert a[2:] == (None, None, None, {}, None, None, None) and k == {"lone_image_threads": None}


def test_every_serving_option_reaches_the_kserve_bundle_bench_kserve_serves(tmp_path):
    # make bench-serve passes BENCH_SERVE_ARGS to bench_kserve too: they are in the bundle both of its servers read.
    import json
    import zipfile

    from benchmarks import bench_kserve
    from serving.torchserve import read_properties

    args = bench_serve_args(["--batch-size", "1", "--max-batch-delay", "50", "--cpu-threads", "1", "--workers", "1",
                             "--engine", "eager-fp32", "--lone-image-threads", "0", "--ts-property", "job_queue_size=9"])
    bundle = bench_kserve.bundle_from_arguments(tmp_path, args)
    with zipfile.ZipFile(bundle / "model-store" / "cifar100.mar") as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        config = yaml.safe_load(mar.read(manifest["configFile"]))
    assert (config["batchSize"], config["maxBatchDelay"], config["minWorkers"], config["maxWorkers"]) == (1, 50, 1, 1)
    assert {k: config["handler"][k] for k in ("engine", "cpu_threads", "lone_image_threads")} == {
        "engine": "eager-fp32", "cpu_threads": 1, "lone_image_threads": 0}
    properties = read_properties(bundle / "config" / "config.properties")
    assert properties["job_queue_size"] == "9"
    # The snapshot TorchServe loads replaces the archive's settings: it carries them too.
    (snapshot,) = json.loads(properties["model_snapshot"])["models"]["cifar100"].values()
    assert (snapshot["batchSize"], snapshot["maxBatchDelay"], snapshot["minWorkers"]) == (1, 50, 1)

    # Without options: the repository's model-config.yaml as it is.
    plain = bench_kserve.bundle_from_arguments(tmp_path / "plain", bench_serve_args([]))
    with zipfile.ZipFile(plain / "model-store" / "cifar100.mar") as mar:
        assert yaml.safe_load(mar.read("model-config.yaml")) == read_model_config()


def bench_serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_load_arguments(parser)
    return parser.parse_args(argv)


def test_the_benchmarks_refuse_each_torchserve_option_with_the_running_torchserve(capsys):
    # --running-torchserve measures a TorchServe with its own settings: an option that would shape the one started
    # for the run (every load option but the load's own and --weights, the in-process column's) is refused, not
    # ignored. Refused on parsing, before any image is read.
    parser = argparse.ArgumentParser()
    bench_serve.add_load_arguments(parser)
    shaping = {action.option_strings[-1]: action.dest for action in parser._actions
               if action.dest not in ("help", "duration", "warmup", "concurrency", "weights")}
    assert shaping == bench_serve.TORCHSERVE_SETTING_OPTIONS
    values = {"--ts-property": "job_queue_size=9", "--flip-tta": "on", "--before": "HEAD"}
    for main, options in ((bench_serve.main, shaping), (bench_adapter.main, [*shaping, "--flip-tta", "--before"]),
                          (bench_photos.main, shaping)):
        for option in options:
            with pytest.raises(SystemExit) as refused:
                main(["--running-torchserve", option, values.get(option, "1")])
            assert refused.value.code == 2
            assert f"own settings: {option} would not reach it" in capsys.readouterr().err


def test_bench_engines_prints_every_point_of_each_engine_it_ran(capsys):
    from benchmarks import bench_engines

    assert bench_engines.main(["--widths", "3", "--engines", "eager-fp32", "openvino-int8", "--seconds", "0.05",
                               "--rounds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for batch, threads in bench_engines.POINTS:
        assert f"width 3, batch {batch}, {threads} thread(s): eager-fp32 " in out
    # openvino-int8 with the price of its rechecks beside it (its network alone).
    assert len(re.findall(r"openvino-int8: [0-9.]+% of the images rechecked by fp32 \(close calls\); its int8 "
                          r"network alone, not servable: [0-9,]+ img/s", out)) == len(bench_engines.POINTS), out


def test_bench_engines_prints_no_ratio_without_eager_fp32_to_divide_by(capsys):
    from benchmarks import bench_engines

    assert bench_engines.main(["--widths", "3", "--engines", "openvino-int8", "--seconds", "0.05", "--rounds", "1",
                               "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    points = [line for line in out.splitlines() if line.startswith("width 3, batch ")]
    assert len(points) == len(bench_engines.POINTS) and all(re.search(r"openvino-int8 [0-9,]+ img/s$", line)
                                                             for line in points), out  # was "(55.04x)": x/1.0
    assert not re.search(r"not servable: [0-9,]+ img/s \(", out), out


def test_bench_engines_caps_only_a_cpus_instruction_set(monkeypatch, capsys):
    # MOCK: CUDA's presence is patched (no GPU here): the option check runs before any GPU work.
    import pytest
    import torch

    from benchmarks import bench_engines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        bench_engines.main(["--device", "cuda", "--emulate-isa", "avx2"])
    assert "--emulate-isa caps a CPU's instruction set: it needs --device cpu" in capsys.readouterr().err
