"""One home for each fact: serving/settings.py agrees with the files other programs read themselves
(TorchServe's config.properties, the archive's model-config.yaml), and nothing else keeps a copy."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.config import Settings
from serving import settings
from serving.torchserve import BASE_CONFIG, default_instance
from torchserve_memory import jvm_flag_mib, room_for_arrivals_mib

ROOT = Path(__file__).resolve().parents[1]


def test_config_properties_ports_are_the_settings_ports():
    instance = default_instance()  # the one place the code reads config.properties' ports
    assert instance.ports == settings.TORCHSERVE_PORTS, BASE_CONFIG
    assert instance.inference_url == f"http://{settings.TORCHSERVE_HOST}:{settings.TORCHSERVE_PORTS['inference']}"


def test_the_archives_topk_is_the_settings_top_k():
    config = settings.read_model_config()
    assert config["handler"]["topk"] == settings.TOP_K


def test_adapter_defaults_come_from_the_settings_module():
    s = Settings()
    assert s.model_name == settings.MODEL_NAME and s.max_upload_bytes == settings.MAX_UPLOAD_BYTES
    assert s.inference_url.endswith(f":{settings.TORCHSERVE_PORTS['inference']}")
    assert s.management_url.endswith(f":{settings.TORCHSERVE_PORTS['management']}")


def test_torchserves_heap_holds_every_body_it_may_hold_at_once():
    """config.properties' arithmetic: Java exits when its heap runs out, so the largest requests waiting
    (job_queue_size), in the workers' batches (with each batch's encoded copy) and being copied out of
    Netty must fit in the heap bodies can use with ~100 MiB for TorchServe itself; the adapter's uploads must fit
    in a request."""
    from serving.torchserve import read_properties

    props = read_properties(BASE_CONFIG)
    config = settings.read_model_config()
    request_mib = int(props["max_request_size"]) / 2**20
    heap_mib = jvm_flag_mib(props["vmargs"], "-Xmx")
    netty_threads = 4  # Netty's default: twice the cores of this 2-core host
    in_batches = config["maxWorkers"] * config["batchSize"] * 2  # each body, and the batch's encoded copy
    held = (int(props["job_queue_size"]) + in_batches + netty_threads) * request_mib
    # A body lives in the old generation or in eden, not in the survivor spaces: the serial collector's
    # default split (NewRatio 2, SurvivorRatio 8) gives those two 2/30 of the heap.
    assert not any(flag.startswith(("-XX:NewRatio", "-XX:SurvivorRatio", "-Xmn")) for flag in props["vmargs"].split())
    usable_mib = heap_mib * (1 - 2 / 30)
    assert held + 100 <= usable_mib, (held, usable_mib)
    assert int(props["max_request_size"]) > settings.MAX_UPLOAD_BYTES


def test_what_the_adapter_forwards_at_once_fits_torchserves_direct_memory_beside_the_batches():
    """Bodies arriving at TorchServe and each worker's batch copied to it share Java's direct memory; 96 of the
    largest uploads at once straight to TorchServe lost batches (tests/test_hostile.py). The adapter forwards
    at most MAX_BYTES_IN_FLIGHT of bodies at once (a 504's stay counted until TorchServe's responseTimeout), so
    through it they always fit."""
    from serving.torchserve import read_properties

    config = settings.read_model_config()
    room = room_for_arrivals_mib(read_properties(BASE_CONFIG), config["maxWorkers"], config["batchSize"])
    assert Settings().max_bytes_in_flight / 2**20 <= room, room


def test_the_adapter_never_sends_torchserve_more_than_it_holds():
    """TorchServe answers 503 past job_queue_size waiting requests, and a burst may arrive while the workers' batches
    are empty: three clients of 16 each overflowed it through the adapter's 64 pooled connections, and 32 still did
    (tests/test_client_shares.py; the hostile probe, session 51)."""
    from serving.torchserve import read_properties

    assert Settings().max_connections <= int(read_properties(BASE_CONFIG)["job_queue_size"])


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


def test_adapter_and_metrics_ports_refuse_what_is_not_a_port_naming_the_variable(tmp_path, monkeypatch):
    """ADAPTER_PORT was read by a bare int(): `abc` ended `adapter.run start` with a traceback that named no
    setting, and 0 or 70000 were taken; METRICS_PORT=70000 passed as a positive number. README: an unusable
    setting stops the start with the variable's name."""
    from adapter.config import ConfigError

    for bad in ("abc", "0", "70000", "80.5"):
        env = {**os.environ, "ADAPTER_PORT": bad, "ADAPTER_LOG_DIR": str(tmp_path / "logs")}
        for command in ("start", "status", "serve"):
            done = subprocess.run([sys.executable, "-m", "adapter.run", command], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2 and "Traceback" not in done.stderr, (bad, command, done.stderr)
            assert f"ADAPTER_PORT={bad!r} is not a port number (1-65535)" in done.stderr, (bad, command, done.stderr)
        assert not (tmp_path / "logs" / "adapter.pid").exists()
    monkeypatch.setenv("METRICS_PORT", "9100")
    assert Settings.from_env().metrics_port == 9100
    for bad in ("0", "70000", "abc"):
        monkeypatch.setenv("METRICS_PORT", bad)
        try:
            Settings.from_env()
        except ConfigError as err:
            assert f"METRICS_PORT={bad!r} is not a port number" in str(err), err
        else:
            raise AssertionError(f"METRICS_PORT={bad!r} was accepted")


# --- the documented defaults are the code's (a default changed in one place only passed every test) ---

def _setting_fields() -> dict[str, str]:
    """Environment variable -> Settings field, as Settings.from_env reads them."""
    import inspect
    import re

    source = inspect.getsource(Settings.from_env)
    return dict((env, name) for name, env in re.findall(r'(\w+)=(?:_env_\w+|os\.environ\.get)\(\s*"([A-Z_]+)"', source))


def _documented_value(text: str):
    """A default as README or adapter/config.py's docstring writes it -> a value, or ... when not a number."""
    import re

    text = re.sub(r"\s*\(\d+ [KM]B\)$", "", text.strip())  # "10485760 (10 MB)": the bytes count
    if text in ("none", "(none)"):
        return []
    if text in ("unset", "(unset)"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)( MB| KB| bytes/s)?", text)
    if not match:
        return ...
    return float(match[1]) * {None: 1, " bytes/s": 1, " KB": 1024, " MB": 1024 * 1024}[match[2]]


def _same(documented, value) -> bool:
    if isinstance(documented, float) and isinstance(value, (bool, int, float)):
        return documented == float(value)
    return documented == (value or ([] if documented == [] else None))


def _compare_table(rows: list[tuple[str, str]]) -> int:
    """Each (names, defaults) row checked against Settings(); how many values were compared."""
    fields, defaults, compared = _setting_fields(), Settings(), 0
    for names, values in rows:
        names, values = [n.strip(" `") for n in names.split(" / ")], values.split(" / ")
        assert len(names) == len(values), (names, values)
        for name, text in zip(names, values):
            documented = _documented_value(text)
            if name not in fields or documented is ...:
                continue
            value = getattr(defaults, fields[name])
            assert _same(documented, value), f"{name}: documented {text!r}, Settings() has {value!r}"
            compared += 1
    return compared


def test_readmes_settings_table_states_the_adapters_defaults():
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| setting | default | limit |"):]
    table = table[:table.index("\n\n")]
    rows = re.findall(r"^\| (`[A-Z_]+`(?: / `[A-Z_]+`)*) \| ([^|]+) \|", table, re.M)
    assert len(rows) >= 20, rows
    assert _compare_table([(names, values.strip()) for names, values in rows]) >= 30


def test_the_config_modules_table_states_the_adapters_defaults():
    import re

    import adapter.config

    entries, current = [], None  # (names, the entry's last line)
    for line in adapter.config.__doc__.splitlines():
        start = re.match(r"    ([A-Z][A-Z_]+(?: / [A-Z][A-Z_]+)*)\s", line)
        if start:
            current = [start[1], line]
            entries.append(current)
        elif current and line.startswith("      "):
            current[1] = line
    rows = [(names, re.split(r"\s{2,}", last.strip())[-1]) for names, last in entries]
    assert len(rows) >= 40, rows
    assert _compare_table(rows) >= 35


def test_readme_states_the_image_and_grpc_limits_the_code_has():
    import re

    from adapter.metrics import RENDER_REUSE_S
    from handler.grpc_relay import MAX_HEADER_BLOCK_BYTES, MAX_HEADER_FIELDS
    from handler.protocols import MAX_DATA_DEPTH, NAME_SHOWN
    from serving import images

    # read, not imported: handler.kserve_predictor imports kserve, which tests/kserve_types.py may have stood in for
    predictor = (ROOT / "handler" / "kserve_predictor.py").read_text()
    MAX_GRPC_PARAMETERS = int(re.search(r"^MAX_GRPC_PARAMETERS = (\d+)$", predictor, re.M)[1])
    GRPC_MESSAGE_GRACE_S = float(re.search(r"^GRPC_MESSAGE_GRACE_S = ([\d.]+)$", predictor, re.M)[1])
    MAX_STREAMS = int(re.search(r"^MAX_STREAMS = (\d+)$", predictor, re.M)[1])

    readme = " ".join((ROOT / "README.md").read_text().split())
    documented = {  # the constant, and how README states its number
        "MAX_JPEG_SCANS": (images.MAX_JPEG_SCANS, r"more than (\d+) scans, `MAX_JPEG_SCANS`", 1),
        "MAX_TIFF_TAGS": (images.MAX_TIFF_TAGS, r"more than (\d+) entries, `MAX_TIFF_TAGS`", 1),
        "MAX_BLOCKS": (images.MAX_BLOCKS, r"more than (\d+) blocks, `MAX_BLOCKS`", 1),
        "BLOCK_BYTES": (images.BLOCK_BYTES, r"one per (\d+) bytes of the file if that is more, `BLOCK_BYTES`", 1),
        "MAX_PPM_HEADER_BYTES": (images.MAX_PPM_HEADER_BYTES, r"longer than (\d+) bytes, `MAX_PPM_HEADER_BYTES`", 1),
        "MAX_EXIF_BYTES": (images.MAX_EXIF_BYTES, r"over (\d+) KB, `MAX_EXIF_BYTES`", 1024),
        "MAX_BMP_RLE_PIXELS": (images.MAX_BMP_RLE_PIXELS, r"RLE of over ([\d,]+) pixels \(\d+x\d+\), `MAX_BMP_RLE_",
                               1),
        "MAX_PLAIN_PNM_BYTES": (images.MAX_PLAIN_PNM_BYTES, r"P1-P3, over (\d+) KB, `MAX_PLAIN_PNM_BYTES`", 1024),
        "MAX_BMP_RLE_BYTES": (images.MAX_BMP_RLE_BYTES, r"or over (\d+) KB, `MAX_BMP_RLE_BYTES`", 1024),
        "MAX_SCALED_PNM_SAMPLES": (images.MAX_SCALED_PNM_SAMPLES, r"of over (\d+) samples, `MAX_SCALED_PNM_SAMPLES`", 1),
        "MAX_TIFF_CHUNKS": (images.MAX_TIFF_CHUNKS, r"listing over (\d+) strips or tiles, `MAX_TIFF_CHUNKS`", 1),
        "MAX_REQUEST_PIXELS": (images.MAX_REQUEST_PIXELS, r"(\d+) MP to decode in all \(`MAX_REQUEST_PIXELS`", 10**6),
        "MAX_GRPC_PARAMETERS": (MAX_GRPC_PARAMETERS, r"`MAX_GRPC_PARAMETERS` \((\d+)\)", 1),
        "MAX_DATA_DEPTH": (MAX_DATA_DEPTH, r"`MAX_DATA_DEPTH` \((\d+)\)", 1),
        "NAME_SHOWN": (NAME_SHOWN, r"cut to (\d+) characters, `NAME_SHOWN`", 1),
        "MAX_HEADER_FIELDS": (MAX_HEADER_FIELDS, r"more than (\d+) fields, `MAX_HEADER_FIELDS`", 1),
        "MAX_HEADER_BLOCK_BYTES": (MAX_HEADER_BLOCK_BYTES, r"more than (\d+) KiB as sent, `MAX_HEADER_BLOCK_BYTES`", 1024),
        "GRPC_MESSAGE_GRACE_S": (GRPC_MESSAGE_GRACE_S, r"`--grpc_message_grace_s` \((\d+) s\)", 1),
        "MAX_STREAMS": (MAX_STREAMS, r"more than `--max_streams` streams in the last second \((\d+),", 1),
        "RENDER_REUSE_S": (RENDER_REUSE_S, r"for up to (\d+) s \(`RENDER_REUSE_S`", 1),
    }
    for name, (value, pattern, unit) in documented.items():
        match = re.search(pattern, readme)
        assert match, f"README no longer states {name} as {pattern!r}"
        assert int(match[1].replace(",", "")) * unit == value, f"{name}: README says {match[1]}, the code has {value}"


def test_readme_says_which_torchserve_logs_roll_over_as_log4j2_xml_does():
    """README said every TorchServe log, torchserve_launcher.log too, rolled over at roll_size and at midnight;
    the launcher log is Java's console in a file serving/torchserve.py empties at each start (no appender rolls
    it), and the two metrics logs that do roll over went unnamed."""
    import re

    rolled = {Path(name).name for name in re.findall(r'<RollingFile [^>]*fileName="([^"]+)"',
                                                       (ROOT / "serving" / "log4j2.xml").read_text())}
    paragraph = (ROOT / "README.md").read_text().split("**TorchServe's logs**", 1)[1].split("\n\n", 1)[0]
    before, after = paragraph.split("roll over at `roll_size`", 1)
    assert set(re.findall(r"`(\w+\.log)`", before)) == rolled, (sorted(rolled), before)
    assert "`torchserve_launcher.log`" in after and "never rolls over" in after, after


def test_the_failed_loads_that_end_a_start_are_a_setting(monkeypatch):
    """TS_START_LOAD_FAILURES: how many failed loads of the model end make serve's (and a rollout's) wait."""
    from serving.torchserve import LOAD_FAILURES_DEFAULT, TorchServeError, default_instance

    monkeypatch.delenv("TS_START_LOAD_FAILURES", raising=False)
    assert default_instance().load_failures_to_give_up == LOAD_FAILURES_DEFAULT
    assert f"(`TS_START_LOAD_FAILURES`, {LOAD_FAILURES_DEFAULT};" in (ROOT / "README.md").read_text()
    monkeypatch.setenv("TS_START_LOAD_FAILURES", " 7 ")
    assert default_instance().load_failures_to_give_up == 7
    for bad in ("0", "-1", "x", "2.5"):
        monkeypatch.setenv("TS_START_LOAD_FAILURES", bad)
        with pytest.raises(TorchServeError, match="TS_START_LOAD_FAILURES="):
            default_instance()
