"""Build model_store/cifar100.mar with torch-model-archiver (``make archive``).

The archive holds:
  CIFAR100_model.pth (or the --weights file's name)  the state dict (--serialized-file)
  network.py                                          the network definition (--model-file)
  cifar100_handler.py                                 the handler class (--handler)
  model-config.yaml                                   batching, workers, timeout, top-k (--config-file)
  index_to_name.json                                  the 100 class names
  calibration.json                                    temperature + unsure threshold, when the one beside
                                                      the weights was fitted on them (training/calibrate.py)
  engines.json                                        each engine's accuracy on the test split, when
                                                      measured on exactly these weights (training/engines.py)
  engine_inputs.pt                                    training images: int8 calibration, start-up probe
  engine_int8.xml + .bin                              the openvino-int8 engine's network, when made from
                                                      exactly these weights (training/quantize.py)
  model/, handler/, serving/settings.py, images.py,   the packages the handler imports
  avif.py, client_text.py

The version says which weights it holds: ``w<width>-<first 8 hex of the weights' sha256>``. The
archive is rebuilt only when an input changed (a digest of all inputs sits beside it), so
``make archive`` is cheap to run before every start.

    python -m serving.archive [--weights PATH] [--model-config YAML] [--export-path model_store] [--force]

Another model-config.yaml (flip TTA on, other batching): ``--model-config``, or ``TS_MODEL_CONFIG`` for
every command that builds or starts an archive (``make serve TS_MODEL_CONFIG=...``): the adapter reads
the same variable for TorchServe's response timeout.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from serving import cli
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from serving.settings import (CALIBRATION_FILE, ENGINE_INPUTS_FILE, ENGINE_INT8_FILE, ENGINE_RECORD_FILE, MODEL_CONFIG,
                              MODEL_NAME, read_model_config)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = REPO / "model_store"
HANDLER_FILE = REPO / "handler" / "cifar100_handler.py"
NETWORK_FILE = REPO / "model" / "network.py"
CLASS_NAMES_FILE = REPO / "model" / "index_to_name.json"
# Packages the handler imports inside the worker, copied as they are (no caches, no weights).
# (The handler module itself goes in once, at the archive root, via --handler.)
PACKAGES = {"model": ["*.py", "index_to_name.json"],
            "handler": ["__init__.py", "preprocessing.py", "protocols.py", "calibration.py", "explain.py", "engine.py",
                        "answers.py"],
            # the shared facts (top-k, v2 output names) and the decoding rules the adapter shares
            "serving": ["__init__.py", "settings.py", "images.py", "avif.py", "client_text.py"]}


class ArchiveError(RuntimeError):
    pass


def model_config_path(given: Path | None = None) -> Path:
    """The model-config.yaml an archive packs: ``given`` (a --model-config), else ``TS_MODEL_CONFIG`` (set and not
    empty), else handler's."""
    return Path(given or os.environ.get("TS_MODEL_CONFIG") or MODEL_CONFIG)


def startup_timeout_s(model_config: Path | None = None) -> float:
    """model-config.yaml's ``startupTimeout``: how long TorchServe lets a worker start (a first start on a
    machine compiles its engine), and so how long a caller waits for a READY worker. ``None``: the
    model_config_path() file. ArchiveError when the file is not a model config."""
    path = model_config_path(model_config)
    try:
        config = read_model_config(path)
        return float(config["startupTimeout"])
    except OSError as err:
        raise ArchiveError(f"model config {path}: {err.strerror}") from None
    except (UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError, ValueError):
        raise ArchiveError(f"model config {path}: not a model-config.yaml with a numeric startupTimeout") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_version(weights: Path) -> str:
    """``w<width>-<sha8>``: which network size and which exact weights the archive serves."""
    import torch  # here, not at module level: the rest of serving/ runs without torch

    from model import WeightsError, check_class_count, load_class_names, network_from_state_dict

    try:
        # A plain state dict, as the handler loads it; strict: refuses what the handler could not load.
        network = network_from_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ArchiveError(f"{weights} is not a CIFAR100Model state dict: {err}") from err
    try:
        check_class_count(network.num_classes, load_class_names(CLASS_NAMES_FILE), str(weights))  # the names packed
    except WeightsError as err:
        raise ArchiveError(str(err)) from err
    return f"w{network.width}-{sha256_of(weights)[:8]}"


def _record_for(weights: Path, name: str) -> Path | None:
    """The JSON record ``name`` beside the weights, if it was made from exactly these weights."""
    import json

    path = Path(weights).resolve().parent / name
    if not path.is_file():
        return None
    try:
        fitted_on = json.loads(path.read_text()).get("weights_sha256")
    except ValueError as err:
        raise ArchiveError(f"{path} is not JSON: {err}") from err
    if fitted_on != sha256_of(Path(weights)):
        return None
    return path


def calibration_warning(weights: Path) -> str | None:
    """Why these weights will be served uncalibrated (no file beside them, or one for other weights); None if not."""
    if calibration_for(weights) is not None:
        return None
    path = Path(weights).resolve().parent / CALIBRATION_FILE
    why = "was fitted on other weights" if path.is_file() else "is missing"
    fit = cli.module_command("training.calibrate", weights)
    return (f"warning: {path} {why}: serving uncalibrated probabilities, and no answer is marked unsure. "
            f"`{fit}` fits one for these weights on the CIFAR-100 test split.")


def calibration_for(weights: Path) -> Path | None:
    """The calibration.json beside the weights, if it was fitted on exactly these weights."""
    return _record_for(weights, CALIBRATION_FILE)


def engine_record_for(weights: Path) -> Path | None:
    """The engines.json beside the weights, if it measured exactly these weights (else only the lossless
    engines, eager/compiled fp32, may be served: `python -m training.engines` measures the others)."""
    return _record_for(weights, ENGINE_RECORD_FILE)


def int8_network_for(weights: Path) -> Path | None:
    """The int8 IR beside the weights, if training/quantize.py made it from exactly these weights (its
    rt_info names them; read as XML: the archive needs no OpenVINO)."""
    import xml.etree.ElementTree as ET

    path = Path(weights).resolve().parent / ENGINE_INT8_FILE
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        return None
    try:
        made_for = ET.parse(path).getroot().find("rt_info/cifar100/weights_sha256")
    except ET.ParseError as err:
        raise ArchiveError(f"{path} is not an OpenVINO IR: {err}") from err
    if made_for is None or made_for.get("value") != sha256_of(Path(weights)):
        return None
    return path


def int8_record_warning(weights: Path) -> str | None:
    """Why the int8 network packed will not be served: engines.json measured another one (None if not)."""
    import json

    from handler.engine import OPENVINO_INT8, int8_network_sha256

    record, int8 = engine_record_for(weights), int8_network_for(weights)
    measured = json.loads(record.read_text()).get("engines", {}).get(OPENVINO_INT8) if record and int8 else None
    if measured is None or measured.get("network_sha256") == int8_network_sha256(int8):
        return None
    measure = cli.module_command("training.engines", weights)
    return (f"warning: {record} measured another {ENGINE_INT8_FILE} than the one beside the weights (made anew "
            f"since?): openvino-int8 will not be served. `{measure}` measures it.")


def package_files(weights: Path = SHIPPED_WEIGHTS) -> list[tuple[Path, str]]:
    """(source, path inside the archive) of every packaged support file."""
    files = [(CLASS_NAMES_FILE, "index_to_name.json")]
    calibration = calibration_for(weights)
    if calibration is not None:
        files.append((calibration, CALIBRATION_FILE))
    record = engine_record_for(weights)
    if record is not None:
        files.append((record, ENGINE_RECORD_FILE))
    int8 = int8_network_for(weights)
    if int8 is not None:
        files += [(int8, ENGINE_INT8_FILE), (int8.with_suffix(".bin"), Path(ENGINE_INT8_FILE).with_suffix(".bin").name)]
    # Training images: the ones beside the weights (their probe picked for them by training/engines.py), else the
    # shipped ones (int8's calibration fits any weights; the handler holds a probe of others to a stricter line).
    inputs = Path(weights).resolve().parent / ENGINE_INPUTS_FILE
    inputs = inputs if inputs.is_file() else SHIPPED_WEIGHTS_DIR / ENGINE_INPUTS_FILE
    if inputs.is_file():
        files.append((inputs, ENGINE_INPUTS_FILE))
    for package, patterns in PACKAGES.items():
        for pattern in patterns:
            files += [(p, f"{package}/{p.name}") for p in sorted((REPO / package).glob(pattern))]
    return files


def inputs_digest(weights: Path, version: str, model_config: Path = MODEL_CONFIG) -> str:
    digest = hashlib.sha256(version.encode())
    for path in [weights, HANDLER_FILE, model_config, NETWORK_FILE] + [src for src, _ in package_files(weights)]:
        digest.update(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path).encode())
        digest.update(sha256_of(path).encode())
    return digest.hexdigest()


def stamp_of(mar: Path) -> Path:
    """Where the digest of an archive's inputs is kept: beside it."""
    return mar.with_name(mar.name + ".inputs")


def build_archive(weights: Path = SHIPPED_WEIGHTS, export_path: Path = DEFAULT_EXPORT,
                  force: bool = False, quiet: bool = False, model_config: Path = MODEL_CONFIG) -> Path:
    """Build (or keep, when its inputs are unchanged) ``<export_path>/cifar100.mar``; return its path.

    ``model_config`` replaces handler/model-config.yaml (the benchmark tries other batch settings).
    """
    weights, export_path = Path(weights).resolve(), Path(export_path).resolve()
    if not weights.is_file():
        raise ArchiveError(f"weights file {weights} not found (train one, or pass --weights)")
    version = weights_version(weights)
    startup_timeout_s(model_config)  # a missing or foreign model config refused by name, before the archiver runs
    mar = export_path / f"{MODEL_NAME}.mar"
    stamp = stamp_of(mar)
    digest = inputs_digest(weights, version, Path(model_config))
    for warning in () if quiet else (calibration_warning(weights), int8_record_warning(weights)):
        if warning is not None:
            print(warning, file=sys.stderr)
    # Not a zip: a write cut short (disk full, a kill) that the stamp must not call up to date.
    if not force and zipfile.is_zipfile(mar) and stamp.is_file() and stamp.read_text().strip() == digest:
        if not quiet:
            print(f"{mar.relative_to(REPO) if mar.is_relative_to(REPO) else mar} is up to date (version {version})")
        return mar
    export_path.mkdir(parents=True, exist_ok=True)
    # The stamp goes first and comes back last: a build interrupted in between leaves no stamp, so the next
    # build is never "up to date" with a half-written or other weights' archive.
    stamp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="cifar100-archive-") as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}-build-", dir=export_path) as out:
        extra = Path(tmp, "extra")
        for src, dest in package_files(weights):
            Path(extra, dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, extra / dest)
        archiver = Path(sys.executable).with_name("torch-model-archiver")
        cmd = [str(archiver if archiver.exists() else "torch-model-archiver"),
               "--model-name", MODEL_NAME, "--version", version,
               "--model-file", str(NETWORK_FILE), "--serialized-file", str(weights),
               "--handler", str(HANDLER_FILE), "--config-file", str(model_config),
               # a directory's *contents* are copied into the archive root: model/, handler/, index_to_name.json
               "--extra-files", str(extra),
               # beside the archive (one file system, for os.replace), never over it: a server may be reading it
               "--export-path", out, "--force"]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two builds
        # (a test session and `make archive`) from mixing their files.
        env = dict(os.environ, TMPDIR=tmp, TEMP=tmp)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed ({result.returncode}):\n{result.stderr[-3000:]}")
        os.replace(Path(out, mar.name), mar)  # whole or not at all
    written = stamp.with_name(stamp.name + ".tmp")
    written.write_text(digest + "\n")
    os.replace(written, stamp)
    if not quiet:
        print(f"built {mar} (version {version}, {mar.stat().st_size / 1e6:.1f} MB) from {weights}")
    return mar


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("serving.archive", __doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--export-path", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--model-config", type=Path, default=None,
                        help="the model-config.yaml to pack (default: TS_MODEL_CONFIG, else handler/model-config.yaml)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    args = parser.parse_args(argv)
    try:
        build_archive(args.weights, args.export_path, args.force, model_config=model_config_path(args.model_config))
    except ArchiveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
