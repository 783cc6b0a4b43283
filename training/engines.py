"""Measure every serving engine on the full CIFAR-100 test split and write the record the handler reads.

    python -m training.engines [WEIGHTS] [--data-dir DIR] [--engines compile-bf16 int8 ...]
    python -m training.engines --device cuda --record FILE   # a GPU's figures, in a file of their own

Writes, beside the weights (serving/archive.py packs both into the archive):
  engines.json       per engine: top-1, top-1 agreement with eager fp32, passed (the guard's limits in
                     handler/engine.py), the same with flip TTA for the lossy engines, its agreement on the
                     start-up probe, the calibration refit for that engine when its fitted temperature or
                     unsure threshold moved; the machine it was measured on
  engine_inputs.pt   CIFAR-100 *training* images, never test images: ``calibration`` for int8 (drawn once),
                     ``probe`` for the worker's start-up self-check: fp32's closest calls (smallest gap between
                     its two largest logits), picked again whenever the weights measured are others

openvino-int8 is measured from the engine_int8.xml beside the weights (``python -m training.quantize``
makes it), as served: with its rechecks (the record keeps their share, the logit gap that makes a close call and
the sha256 of the .xml + .bin it measured: the handler serves no other int8 network on these figures).

Engines this machine cannot run (bf16 without native bf16) are skipped and keep their earlier
entry. On a GPU (``--device cuda``) the record goes where ``--record`` says: the shipped record is the
CPUs' (a GPU worker checks its engine on the probe images at start, handler/engine.py). The compiled
packages land in the engine cache TorchServe uses (served_cache()), so a TorchServe started afterwards on
this machine loads them instead of compiling.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from handler import engine as engines
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from serving.settings import CALIBRATION_FILE, read_model_config
from serving import cli
from training.runtime import (DEVICE_HELP, atomic_save, atomic_write, device_argument, pick_device, served_weights,
                              user_errors)

CALIBRATION_IMAGES = 256
# Closer calls than this flip under any engine's rounding, good or broken: they would only add chance to the
# probe (on 256 images from 0.02 the engines that pass the guard agreed 91.8-92.6%; from 0.001, 87-90%).
PROBE_MIN_LOGIT_GAP = 0.02
# A refit calibration is kept for an engine when its temperature moved by more than this share,
# or its unsure threshold changed (the grid is 0.01).
TEMPERATURE_TOLERANCE = 0.01



def in_process_engine(weights: Path, setting: str = engines.AUTO, model: torch.nn.Module | None = None,
                      flip_tta: bool | None = None, config: dict | None = None):
    """The engine a TorchServe worker started from this checkout builds for ``weights``, built the same
    way in this process (same record, probe, batch bound, threads and engine cache: the served compiled code);
    ``config``: the model-config the archive packs (None: model-config.yaml); ``flip_tta``: the handler's
    setting (None: the config's)."""
    from handler.engine import serving_model
    from model.normalization import normalize
    from serving.archive import engine_record_for

    weights = Path(weights)
    record_path = engine_record_for(weights)
    inputs = weights.resolve().parent / engines.INPUTS_FILE
    inputs = inputs if inputs.is_file() else SHIPPED_WEIGHTS_DIR / engines.INPUTS_FILE
    if model is None:
        model = serving_model(torch.load(weights, map_location="cpu", weights_only=True))
    config = config or read_model_config()
    with workers_thread_count(config):
        return engines.select_engine(setting, model, hashlib.sha256(weights.read_bytes()).hexdigest(),
                                     engines.images_per_forward(config), torch.device("cpu"),
                                     json.loads(record_path.read_text()) if record_path else None,
                                     engines.load_inputs(inputs.parent), normalize, folder=served_cache(),
                                     shipped_dir=weights.resolve().parent,
                                     flip_tta=engines.flip_tta(config) if flip_tta is None else flip_tta)


def served_cache() -> Path:
    """The engine cache a TorchServe started from this checkout uses (serving/torchserve.py)."""
    from serving.torchserve import DEFAULT_ENGINE_CACHE

    return Path(os.environ.get(engines.CACHE_ENV) or DEFAULT_ENGINE_CACHE)


@contextlib.contextmanager
def workers_thread_count(config: dict | None = None):
    """Compile for a TorchServe worker's thread count (part of the cache key: inductor writes it into its
    kernels), so this process builds or loads the package the workers serve (``config``: their model-config,
    None: model-config.yaml). Called with more threads afterwards, only oneDNN's convolutions use the extra ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(engines.worker_threads(config or read_model_config()))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def training_inputs(images: torch.Tensor, fp32_logits: torch.Tensor, weights_sha256: str,
                    calibration: torch.Tensor | None = None, seed: int = 0) -> dict:
    """engine_inputs.pt from the training ``images`` and fp32's logits on them: ``calibration`` (int8's observers;
    random, or the given ones kept) and ``probe`` (the start-up check: the ``engines.PROBE_IMAGES`` closest calls
    outside the calibration images, closest first), with the weights the probe was picked for."""
    if calibration is None:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        calibration = images[order[:CALIBRATION_IMAGES]].clone()
    top2 = fp32_logits.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    calibration_rows = {image.numpy().tobytes() for image in calibration}
    calibrated = torch.tensor([image.numpy().tobytes() in calibration_rows for image in images], dtype=torch.bool)
    gap[calibrated | (gap < PROBE_MIN_LOGIT_GAP)] = float("inf")
    closest = gap.argsort()[:engines.PROBE_IMAGES]
    return {"calibration": calibration, "probe": images[closest].clone(), "probe_weights_sha256": weights_sha256}


def probe_inputs(path: Path, model: torch.nn.Module, weights_sha256: str, data_dir: str,
                 device: torch.device) -> dict:
    """engine_inputs.pt at ``path``, its probe picked for these weights: written when missing, or when its probe
    was picked for other weights (its calibration images kept: int8's observers see the same images)."""
    from training.data import load_split

    old = torch.load(path, weights_only=True) if path.is_file() else None
    if old is not None and old.get("probe_weights_sha256") == weights_sha256:
        return old
    images, _ = load_split(data_dir, train=True)
    print(f"picking the start-up probe: fp32's closest calls among the {len(images):,} training images", flush=True)
    logits = engine_logits(engines.Engine(engines.EAGER, model), images, device=device)
    inputs = training_inputs(images, logits, weights_sha256, None if old is None else old["calibration"])
    atomic_save(inputs, path)  # whole or not at all: the archive packs whatever is there
    print(f"wrote {path}")
    return inputs


def write_record(record: dict, path: Path) -> None:
    """engines.json, whole or not at all: a run cut short keeps the last full record."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def engine_logits(engine: engines.Engine, images: torch.Tensor, chunk: int = 500,
                  device: torch.device = torch.device("cpu"), flip_tta: bool = False) -> torch.Tensor:
    """``engine``'s float32 logits for uint8 ``images``, normalized on ``device`` (where the engine runs), on the CPU;
    with ``flip_tta``, as the handler answers with flip TTA (Engine.answer: openvino-int8's close calls decided on
    the averaged logits)."""
    from model.normalization import normalize

    return torch.cat([(engine.answer(normalize(part, device), True)[0] if flip_tta else engine(normalize(part, device)))
                      .float().cpu() for part in images.split(chunk // 2 if flip_tta else chunk)])


def guard(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1, agreement with fp32's ``reference`` and pass/fail against the guard's limits (handler/engine.py)."""
    # From counts in Python floats, compared after rounding off float noise: an engine exactly at a limit
    # (0.2 points under, 99.0% agreement) passes, as the limits say.
    n = max(len(labels), 1)
    top1 = int((logits.argmax(1) == labels).sum()) / n
    ref_top1 = int((reference.argmax(1) == labels).sum()) / n
    agreement = int((logits.argmax(1) == reference.argmax(1)).sum()) / n
    passed = round(ref_top1 - top1, 9) <= engines.MAX_TOP1_DROP and round(agreement, 9) >= engines.MIN_AGREEMENT
    return {"top1": round(top1, 4), "agreement": round(agreement, 4), "images": len(labels), "passed": passed}


def measure(name: str, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor,
            shipped: dict | None, measured_on: dict) -> dict:
    """An engine's record entry; ``measured_on`` (date, machine): int8's answers, and so its agreement, depend on
    the CPU's kernels."""
    from training.calibrate import calibrate

    entry = guard(logits, reference, labels)
    fitted = calibrate(logits, labels)
    moved = shipped is not None and (
        abs(fitted["temperature"] - shipped["temperature"]) > TEMPERATURE_TOLERANCE * shipped["temperature"]
        or fitted["unsure"]["threshold"] != shipped["unsure"]["threshold"])
    entry["calibration"] = {"temperature": fitted["temperature"], "unsure_threshold": fitted["unsure"]["threshold"],
                            "moved": bool(moved)}
    entry["measured_on"] = measured_on
    return entry


def kept_entries(old: dict, weights_sha256: str) -> dict:
    """The earlier record's engines, for the same weights only, each saying where and when it was measured: a
    run on another machine re-measures what that machine can run (a CPU without bf16 skips the bf16 engines)
    and keeps the rest."""
    if old.get("weights_sha256") != weights_sha256:
        return {}
    stamp = {"date": old.get("date"), "machine": old.get("machine")}
    return {name: {"measured_on": stamp, **entry} for name, entry in old.get("engines", {}).items()}


@user_errors
def main(argv: list[str] | None = None) -> int:
    from handler.engine import serving_model
    from training.data import default_data_dir, load_split

    parser = cli.Parser("training.engines", __doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, nargs="?", default=SHIPPED_WEIGHTS)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--engines", nargs="+", default=list(engines.ENGINES[1:]), choices=engines.ENGINES[1:])
    parser.add_argument("--threads", type=cli.positive_int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", type=device_argument, help=DEVICE_HELP)
    parser.add_argument("--record", type=Path, help=f"where the record goes (default: {engines.RECORD_FILE} "
                        "beside the weights; needed with a GPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = args.weights.resolve().parent
    device = pick_device(args.device)
    if device.type != "cpu" and args.record is None:
        parser.error(f"--device {args.device}: give --record FILE ({engines.RECORD_FILE} beside the weights is the "
                     "CPUs' record, which CPU workers read)")
    state_dict = served_weights(args.weights)  # before the data load: a wrong file is named at once
    record_path = args.record or folder / engines.RECORD_FILE
    weights_sha = hashlib.sha256(args.weights.read_bytes()).hexdigest()
    old = json.loads(record_path.read_text()) if record_path.is_file() else {}
    measured_on = {"date": datetime.date.today().isoformat(), "machine": engines.machine_description(device)}
    record = {"weights_sha256": weights_sha, **measured_on, "torch": torch.__version__,
              "limits": {"max_top1_drop": engines.MAX_TOP1_DROP, "min_agreement": engines.MIN_AGREEMENT},
              "test_split": "CIFAR-100 test, all 10,000 images",
              "engines": kept_entries(old, weights_sha)}
    calibration_path = folder / CALIBRATION_FILE
    shipped = json.loads(calibration_path.read_text()) if calibration_path.is_file() else None

    images, labels = load_split(args.data_dir, train=False)
    model = serving_model(state_dict).to(device)
    inputs = probe_inputs(folder / engines.INPUTS_FILE, model, weights_sha, args.data_dir, device)
    # Lossy engines are measured with flip TTA too (model-config.yaml's handler.flip_tta): the average of two views
    # can move where neither view's answer did.
    reference = engine_logits(engines.Engine(engines.EAGER, model), images, device=device)
    reference_tta = engine_logits(engines.Engine(engines.EAGER, model), images, device=device, flip_tta=True)
    # fp32's top-1 on the probe: the worker's start-up check compares against it (handler/engine.py).
    record["probe_sha256"] = engines.probe_sha256(inputs["probe"])
    record["probe_fp32_top1"] = engine_logits(engines.Engine(engines.EAGER, model), inputs["probe"],
                                              device=device).argmax(1).tolist()
    record["engines"][engines.EAGER] = measure(engines.EAGER, reference, reference, labels, shipped, measured_on)
    # Written after each engine: a run cut short (a time limit, a crash compiling the next) keeps what it measured.
    write_record(record, record_path)
    max_batch = engines.images_per_forward(read_model_config())  # the workers' bound: their packages, cached
    from model.normalization import normalize

    for name in args.engines:
        why = engines.machine_refusal(name, device)
        if why is not None:
            print(f"{name}: skipped ({why})")
            continue
        started = time.perf_counter()
        # Which int8 network the figures are of, read before it is built (the handler serves no other).
        network = engines.int8_network_sha256(folder / engines.INT8_FILE) if name == engines.OPENVINO_INT8 else None
        try:
            with workers_thread_count():
                engine = engines.build_engine(name, model, weights_sha, max_batch, device,
                                              normalize(inputs["calibration"]), served_cache(), shipped_dir=folder)
        except engines.EngineError as err:  # openvino-int8 before `python -m training.quantize` made its network
            print(f"{name}: skipped ({err})")
            continue
        built = time.perf_counter() - started
        entry = measure(name, engine_logits(engine, images, device=device), reference, labels, shipped, measured_on)
        entry["compile_seconds"] = engine.info.get("compile_seconds")
        if name == engines.OPENVINO_INT8:  # the share of test images fp32 answered again (close calls)
            entry["recheck_logit_gap"] = engines.RECHECK_LOGIT_GAP
            entry["rechecked"] = round(engine.forward.share, 4)
            entry["network_sha256"] = network
        if name not in engines.LOSSLESS:
            entry["flip_tta"] = guard(engine_logits(engine, images, device=device, flip_tta=True), reference_tta, labels)
        # The start-up probe's figure here: an engine the guard passes but the probe would refuse is said now.
        entry["probe_agreement"] = round(engines.probe_agreement(engine, torch.tensor(record["probe_fp32_top1"]),
                                                                 normalize(inputs["probe"], device)), 4)
        record["engines"][name] = entry
        tta = entry.get("flip_tta")
        print(f"{name}: top-1 {entry['top1']:.4f} (fp32 {record['engines'][engines.EAGER]['top1']:.4f}), "
              f"agreement {entry['agreement']:.4f}, {'passed' if entry['passed'] else 'FAILED'}"
              + (f"; flip TTA: top-1 {tta['top1']:.4f}, agreement {tta['agreement']:.4f}, "
                 f"{'passed' if tta['passed'] else 'FAILED'}" if tta else "")
              + f"; start-up probe agreement {entry['probe_agreement']:.4f}"
              f"{' (under its line: workers will refuse it)' if entry['probe_agreement'] < engines.PROBE_MIN_AGREEMENT else ''}"
              f"; temperature {entry['calibration']['temperature']:.4f}"
              f"{' (moved: refit kept)' if entry['calibration']['moved'] else ''}; built in {built:.0f} s", flush=True)
        write_record(record, record_path)
    print(f"wrote {record_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
