"""One home for each fact: serving/settings.py agrees with the files other programs read themselves
(TorchServe's config.properties, the archive's model-config.yaml), and nothing else keeps a copy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from adapter.config import Settings
from serving import settings
from serving.torchserve import BASE_CONFIG, default_instance

ROOT = Path(__file__).resolve().parents[1]


def test_config_properties_ports_are_the_settings_ports():
    instance = default_instance()  # the one place the code reads config.properties' ports
    assert instance.ports == settings.TORCHSERVE_PORTS, BASE_CONFIG
    assert instance.inference_url == f"http://{settings.TORCHSERVE_HOST}:{settings.TORCHSERVE_PORTS['inference']}"


def test_the_archives_topk_is_the_settings_top_k():
    config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    assert config["handler"]["topk"] == settings.TOP_K


def test_adapter_defaults_come_from_the_settings_module():
    s = Settings()
    assert s.model_name == settings.MODEL_NAME and s.max_upload_bytes == settings.MAX_UPLOAD_BYTES
    assert s.inference_url.endswith(f":{settings.TORCHSERVE_PORTS['inference']}")
    assert s.management_url.endswith(f":{settings.TORCHSERVE_PORTS['management']}")


def _mib(size: str) -> float:
    return float(size[:-1]) * {"m": 1, "g": 1024}[size[-1].lower()]


def test_torchserves_heap_holds_every_body_it_may_hold_at_once():
    """config.properties' arithmetic: Java exits when its heap runs out, so the largest requests waiting
    (job_queue_size), in the workers' batches (with each batch's encoded copy) and being copied out of
    Netty must fit in -Xmx with ~100 MiB for TorchServe itself; the adapter's uploads must fit in a request."""
    from serving.torchserve import read_properties

    props = read_properties(BASE_CONFIG)
    config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    request_mib = int(props["max_request_size"]) / 2**20
    heap_mib = _mib(next(flag[len("-Xmx"):] for flag in props["vmargs"].split() if flag.startswith("-Xmx")))
    netty_threads = 4  # Netty's default: twice the cores of this 2-core host
    in_batches = config["maxWorkers"] * config["batchSize"] * 2  # each body, and the batch's encoded copy
    held = (int(props["job_queue_size"]) + in_batches + netty_threads) * request_mib
    assert held + 100 <= heap_mib, (held, heap_mib)
    assert int(props["max_request_size"]) > settings.MAX_UPLOAD_BYTES


def test_the_page_carries_no_copy_of_the_upload_limit():
    for name in ("index.html", "app.js"):
        text = (ROOT / "frontend" / name).read_text()
        assert "10485760" not in text and "10 * 1024 * 1024" not in text, name


def test_settings_module_imports_only_the_standard_library():
    code = ("import sys, serving.settings; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'yaml', 'httpx', 'psutil')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_ts_port_variables_move_their_own_port_and_refuse_what_is_not_a_port():
    assert settings.torchserve_ports({}) == settings.TORCHSERVE_PORTS
    for i, (name, variable) in enumerate(settings.TORCHSERVE_PORT_ENV.items()):
        moved = settings.torchserve_ports({variable: f" {9001 + i} "})
        assert moved == {**settings.TORCHSERVE_PORTS, name: 9001 + i}, variable
    assert settings.torchserve_ports({"TS_INFERENCE_PORT": ""}) == settings.TORCHSERVE_PORTS  # empty: unset
    for edge in ("1", "65535"):
        assert settings.torchserve_ports({"TS_METRICS_PORT": edge})["metrics"] == int(edge)
    for bad in ("0", "65536", "-1", "80.5", "http", "8080x"):
        try:
            settings.torchserve_ports({"TS_MANAGEMENT_PORT": bad})
        except ValueError as err:
            assert "TS_MANAGEMENT_PORT" in str(err) and "1-65535" in str(err), err
        else:
            raise AssertionError(f"TS_MANAGEMENT_PORT={bad!r} was accepted")
