"""The forward pass the handler serves: which engine, built (or loaded from a cache) before READY.

Engines (model-config.yaml ``handler.engine``; ``auto`` picks the first allowed one of its list):
  eager-fp32    the reference: BatchNorm folded, channels_last, float32, plain PyTorch
  compile-fp32  inductor with freezing, float32 (same answers up to float rounding)
  compile-bf16  inductor with freezing, weights and activations in bf16: only where bf16 is native (a CPU with
                avx512_bf16 / amx_bf16, or a GPU)
  int8          PT2E post-training quantization (torchao's x86 inductor quantizer), calibrated on
                CIFAR-100 *training* images shipped in the archive, then inductor: an explicit choice only
                (slower than openvino-fp32 with the CPU capped to AVX2 or AVX-512 VNNI, benchmarks/RESULTS.md)
  openvino-bf16 OpenVINO's CPU runtime, bf16 inference precision: only where bf16 is native; the fastest
                with AMX's tiles (benchmarks/RESULTS.md), so auto's first choice there
  openvino-fp32 OpenVINO's CPU runtime, float32 (same answers up to float rounding)
  openvino-int8 OpenVINO's CPU runtime on an int8 network made once by NNCF and fine-tuned toward fp32's
                logits (``python -m training.quantize``: engine_int8.xml beside the weights, shipped in the
                archive); an image whose int8 answer is a close call (its two largest logits within
                RECHECK_LOGIT_GAP) is answered by openvino-fp32 instead: int8 alone changes ~2% of the
                answers, nearly all of them close calls; auto's first choice on CPUs without AMX

A compiled engine is an AOTInductor package (``torch.export`` with a dynamic batch dimension
1..batchSize, one compile covers every batch a worker receives; larger batches, a v1/v2 request
with many images, run in chunks), or for OpenVINO its IR (.xml + .bin, the same batch bound). Packages live in a cache folder (``CIFAR100_ENGINE_CACHE``, set
by serving/torchserve.py; else ``~/.cache/cifar100-engines``) under a key naming everything that
shapes the code (engine, weights, the network's code, torch, OpenVINO or torchao, device, CPU flags, batch
bound): a restarted worker loads one in well under a second; one that no longer loads is compiled again. A file lock lets one
worker compile while the others wait for it. The folder keeps the ``CIFAR100_ENGINE_CACHE_KEEP`` most
recently used packages (serving/settings.py).

Accuracy guard, in two parts (why: the worker cannot read the test split, the data may be absent):
  * ``python -m training.engines`` measures every engine on the full test split and writes
    ``engines.json`` (top-1, agreement with eager fp32, pass/fail against the limits below, the same with
    flip TTA for the lossy engines, the calibration refit for that engine when it moved; the int8 network it
    measured), packed into the archive beside the weights. ``auto`` serves only engines that passed there (with
    flip TTA too when the handler uses it); an explicit choice that failed is refused.
  * at start, the built engine answers a probe of training images shipped in the archive
    (``engine_inputs.pt``): fp32's closest calls among them (training/engines.py picks them for the weights
    it measures), where a rounding or a broken compiler changes answers first. Agreeing with eager fp32 on
    fewer than ``PROBE_MIN_AGREEMENT`` of them, or for an engine that should equal fp32 (``LOSSLESS``) logits
    further than ``LOSSLESS_MAX_LOGIT_CHANGE`` from fp32's, the engine is broken on THIS machine (a compiler
    bug, bad calibration, a missing recheck) and the worker serves eager fp32 instead, saying why in the log.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from handler.calibration import Calibration
from model import fold_batchnorm, network_from_state_dict, normalize
from serving.settings import (ENGINE_CACHE_ENV, ENGINE_CACHE_KEEP, ENGINE_CACHE_KEEP_ENV, ENGINE_INPUTS_FILE,
                              ENGINE_INT8_FILE, ENGINE_RECORD_FILE)

logger = logging.getLogger(__name__)

EAGER = "eager-fp32"
OPENVINO_INT8 = "openvino-int8"
ENGINES = (EAGER, "compile-fp32", "compile-bf16", "int8", "openvino-bf16", "openvino-fp32", OPENVINO_INT8)
NEEDS_NATIVE_BF16 = {"compile-bf16", "openvino-bf16"}
OPENVINO = {"openvino-bf16": "bf16", "openvino-fp32": "f32"}  # engine -> OpenVINO's inference precision
# openvino-int8: a close call (the int8 network's two largest logits within this) is answered by fp32.
# int8's rounding moves logits by about the same amount whatever the image, so the logit gap finds the answers
# it flips with fewer rechecks than a softmax-probability gap. With the fine-tuned int8 network 0.10 rechecks ~3%
# of test images for 99.4% agreement (the accuracy-controlled one needed 0.25 and ~8%; benchmarks/RESULTS.md,
# sessions 15 and 16).
RECHECK_LOGIT_GAP = 0.10
# Prometheus counters the handler adds per batch (TorchServe's metrics API), labelled with the engine:
# images through the forward pass, and those openvino-int8 answered again with fp32 (the guard's price).
IMAGES_METRIC, RECHECKED_METRIC = "EngineImages", "EngineRecheckedImages"
AUTO = "auto"
# auto's preference, fastest first (benchmarks/RESULTS.md); eager fp32 is always the last resort.
# amx-bf16 (bf16 matrix tiles: Xeon Sapphire Rapids on): openvino-bf16 beat openvino-int8 1.5x.
# avx512-bf16 (bf16 in AVX-512 without AMX: an AMD EPYC Zen 4): openvino-int8 beat openvino-bf16 1.25-1.5x in-process
# and 1.4x through TorchServe (AVX-512 VNNI), as accurate. no-bf16: measured on an AVX2-only EPYC and with
# oneDNN capped to AVX-512 VNNI: openvino-int8 (rechecks included) leads. PT2E int8 ran slower than the
# lossless engines everywhere and fails the guard. A GPU: inductor (OpenVINO here is CPU-only).
# Weights without a record (a new training run, a rollout) get a lossless engine: openvino-fp32 before
# compile-fp32 on every CPU kind, as fast or faster and built in ~2 s where inductor takes ~50 s.
AUTO_ORDER = {"amx-bf16": ("openvino-bf16", "compile-bf16", "openvino-fp32", "compile-fp32"),
              "avx512-bf16": (OPENVINO_INT8, "openvino-bf16", "compile-bf16", "openvino-fp32", "compile-fp32"),
              "no-bf16": (OPENVINO_INT8, "openvino-fp32", "compile-fp32"),
              "gpu": ("compile-bf16", "compile-fp32")}
# Engines whose answers equal eager fp32 up to float rounding: servable without a record.
LOSSLESS = {EAGER, "compile-fp32", "openvino-fp32"}

# The guard's limits on the full test split (training/engines.py applies them, the record keeps them).
MAX_TOP1_DROP = 0.002      # top-1 at most 0.2 points under eager fp32
MIN_AGREEMENT = 0.99       # same top-1 as eager fp32 on at least 99% of test images
# Start-up probe: fp32's 256 closest calls among training images (random training images almost never
# change: openvino-int8 without its rechecks agreed on 100% of them, on 98.59% of the test split). On them the
# engines that pass the test-split guard agreed 91.8-92.6%, those that fail it 71-75% (benchmarks/RESULTS.md,
# session 48, one CPU): the line sits between. How far a good engine's figure moves on other CPUs or a GPU is
# not measured yet (python -m benchmarks.engine_probe); a wrong refusal costs speed, not answers.
PROBE_MIN_AGREEMENT = 0.85
# A probe picked for other weights (the shipped one, beside weights training/engines.py never measured) is mostly
# far from these weights' decisions: there the line is the one random training images had.
OTHER_PROBE_MIN_AGREEMENT = 0.97
PROBE_IMAGES = 256  # of the shipped probe: a few seconds at most on a busy core
# A lossless engine's logits are fp32's up to float rounding (~1e-5 on a CPU): checked on the first few probe images
# against eager fp32 run at start, so new weights without a record are checked as closely. A GPU's convolutions
# round to TF32 by default (cuDNN), ~1e-3 of a value: its bound is looser (not measured: no GPU lent so far).
LOSSLESS_MAX_LOGIT_CHANGE = {"cpu": 1e-2, "cuda": 5e-2}
LOSSLESS_PROBE_IMAGES = 32

ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
# oneDNN's instruction-set caps below AVX512_CORE_BF16: bf16 would be emulated, not native.
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
# ... and below AVX512_CORE_AMX: bf16 in AVX-512 only, without the matrix tiles.
ONEDNN_ISAS_WITHOUT_AMX = ONEDNN_ISAS_WITHOUT_BF16 | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"}
RECORD_FILE, INPUTS_FILE, INT8_FILE, CACHE_ENV = (ENGINE_RECORD_FILE, ENGINE_INPUTS_FILE, ENGINE_INT8_FILE,
                                                   ENGINE_CACHE_ENV)
DEFAULT_CACHE = Path.home() / ".cache" / "cifar100-engines"
PACKAGE_FORMAT = 3  # bump when the way packages are built changes (invalidates the cache)


class EngineError(RuntimeError):
    pass


# ---- what this machine allows -----------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def serving_device() -> torch.device:
    """Where a one-process server (KServe's predictor) runs the network: the first GPU it sees (a pod sees
    the GPUs it was given; ``CUDA_VISIBLE_DEVICES=`` hides them), else the CPU. TorchServe's workers get
    theirs from TorchServe (gpu_id) instead."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def onednn_isa_cap() -> str:
    """The instruction set oneDNN (PyTorch's and OpenVINO's) is told to stay within (ONEDNN_MAX_CPU_ISA), upper case;
    "" when it may use all the CPU has."""
    return os.environ.get(ONEDNN_ISA_ENV, "").upper()


def native_bf16(device: torch.device) -> bool:
    """bf16 runs in hardware here: a GPU, or a CPU with AVX512-BF16 / AMX-BF16 that oneDNN uses."""
    if device.type == "cuda":
        return True
    if onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def without_openvino_telemetry() -> None:
    """OpenVINO's converter (ov.convert_model) and NNCF send usage events to Google Analytics unless a consent file in
    the home folder says no, each event from a process forked off the caller (a TorchServe worker of ~700 MB; with
    grpc loaded, in KServe's model server, a forked child crashed). A model server sends nothing: with the
    telemetry package unimportable, both use their own stubs. Called at import, before either is loaded."""
    sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError


without_openvino_telemetry()


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def pinned_threads(model_config: dict) -> str | int | None:
    """The threads the operator pinned: ``handler.cpu_threads``, else OMP_NUM_THREADS; None when neither."""
    return (model_config.get("handler") or {}).get("cpu_threads") or os.environ.get("OMP_NUM_THREADS")


def worker_threads(model_config: dict) -> int:
    """A CPU worker's torch threads: the pinned ones (``pinned_threads``), else the cores shared out among
    the model's workers (minWorkers; measured in benchmarks/RESULTS.md: two 1-thread workers beat one
    2-thread worker on 2 cores)."""
    pinned = pinned_threads(model_config)
    workers = int(model_config.get("minWorkers") or 1)
    return max(1, int(pinned or (os.cpu_count() or 1) // max(1, workers)))


def lone_image_threads(model_config: dict) -> int:
    """Threads for a forward pass of one image (``handler.lone_image_threads``), on OpenVINO's engines.

    A batch holding a single image means the load is light: the other workers are most likely idle, so
    by default it borrows one neighbour's share of the cores (twice the worker's threads, at most all
    cores; measured on 2 cores only, benchmarks/RESULTS.md). Off (the worker's own threads) when the
    operator pinned the threads, on a worker that already has every core, or when set to 0."""
    handler = model_config.get("handler") or {}
    own = worker_threads(model_config)
    if "lone_image_threads" in handler:
        return max(own, int(handler["lone_image_threads"] or 0))
    if pinned_threads(model_config):
        return own
    return max(own, min(os.cpu_count() or 1, 2 * own))


def flip_tta(model_config: dict) -> bool:
    """model-config.yaml's ``handler.flip_tta`` (off unless set)."""
    return bool((model_config.get("handler") or {}).get("flip_tta", False))


def images_per_forward(model_config: dict) -> int:
    """The engine's batch bound: batchSize images, twice that with flip TTA (each image and its mirror)."""
    return int(model_config.get("batchSize") or 1) * (2 if flip_tta(model_config) else 1)


def machine_kind(device: torch.device) -> str:
    """Which of AUTO_ORDER's lists this machine takes: a GPU, bf16 with AMX's tiles, bf16 in AVX-512 only, none."""
    if device.type == "cuda":
        return "gpu"
    if not native_bf16(device):
        return "no-bf16"
    return "amx-bf16" if "amx_bf16" in cpu_flags() and onednn_isa_cap() not in ONEDNN_ISAS_WITHOUT_AMX else "avx512-bf16"


def machine_description(device: torch.device) -> dict:
    """What the record and the cache key say about the machine."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device)}
    flags = cpu_flags()
    described = {"device": "cpu", "capability": torch.backends.cpu.get_cpu_capability(),
                 "flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in {"fma", "f16c"})}
    if os.environ.get(ONEDNN_ISA_ENV):  # oneDNN (PyTorch's and OpenVINO's) told to use less than the CPU has
        described["onednn_max_isa"] = os.environ[ONEDNN_ISA_ENV]
    return described


def machine_refusal(engine: str, device: torch.device) -> str | None:
    """Why ``engine`` cannot run on this machine at all (None: it can; its accuracy is another matter)."""
    if engine not in ENGINES:
        return f"unknown engine {engine!r} (choices: {AUTO}, {', '.join(ENGINES)})"
    if engine in NEEDS_NATIVE_BF16 and not native_bf16(device):
        return "this CPU has no native bf16 (avx512_bf16 / amx_bf16)"
    if engine == "int8" and device.type == "cuda":
        return "int8 (x86 inductor quantizer) is a CPU engine"
    if engine in OPENVINO or engine == OPENVINO_INT8:
        if device.type == "cuda":
            return "OpenVINO engines run on the CPU"
        if not openvino_installed():
            return "the openvino package is not installed (requirements.txt)"
    return None


def int8_network_sha256(xml: Path) -> str | None:
    """sha256 of an int8 IR's .xml and .bin together (None when either is missing): which int8 network an
    engines.json entry measured (training/engines.py writes it; refusal and serving/archive.py compare it)."""
    digest = hashlib.sha256()
    for part in (xml, xml.with_suffix(".bin")):
        if not part.is_file():
            return None
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def refusal(engine: str, device: torch.device, record: dict | None, shipped_dir: Path | None = None,
            flip_tta: bool = False) -> str | None:
    """Why ``engine`` may not be served here (None: it may); ``shipped_dir``: where openvino-int8's network is;
    ``flip_tta``: the handler answers with flip TTA (a lossy engine must have passed the guard with it too)."""
    why = machine_refusal(engine, device)
    if why is not None or engine in LOSSLESS:
        return why
    measured = (record or {}).get("engines", {}).get(engine)
    if measured is None:
        return f"no accuracy record for it ({RECORD_FILE}: run python -m training.engines)"
    # A lossy engine's rounding is its hardware's: a CPU's figures do not vouch for a GPU's bf16, nor the reverse.
    measured_on = ((measured.get("measured_on") or {}).get("machine") or (record or {}).get("machine") or {}).get("device")
    if measured_on is not None and (measured_on == "cpu") != (device.type == "cpu"):
        return (f"its accuracy record ({RECORD_FILE}) was measured on {'a CPU' if measured_on == 'cpu' else measured_on}, "
                f"not on this {'CPU' if device.type == 'cpu' else 'GPU'}")
    if not measured.get("passed"):
        return (f"it failed the accuracy guard on the test split ({RECORD_FILE}: top-1 "
                f"{measured['top1']:.4f} vs fp32 {record['engines'][EAGER]['top1']:.4f}, agreement "
                f"{measured['agreement']:.4f}; limits: {MAX_TOP1_DROP * 100:.1f} points, {MIN_AGREEMENT:.0%})")
    if flip_tta:
        # The average of two views can move where neither view did (benchmarks/RESULTS.md, session 48).
        tta = measured.get("flip_tta")
        if tta is None:
            return f"no accuracy record for it with flip TTA ({RECORD_FILE}: run python -m training.engines)"
        if not tta.get("passed"):
            return (f"it failed the accuracy guard with flip TTA on ({RECORD_FILE}: top-1 {tta['top1']:.4f}, agreement "
                    f"with fp32's flip TTA {tta['agreement']:.4f}; limits: {MAX_TOP1_DROP * 100:.1f} points, "
                    f"{MIN_AGREEMENT:.0%})")
    if engine == OPENVINO_INT8 and measured.get("recheck_logit_gap") != RECHECK_LOGIT_GAP:
        return (f"its record was not measured with the handler's recheck rule (close calls: logit gap < "
                f"{RECHECK_LOGIT_GAP}; run python -m training.engines)")
    if engine == OPENVINO_INT8 and shipped_dir is not None:
        # A network made anew (python -m training.quantize) was never measured: the record's figures and refit are
        # another network's. No network at all is the build's to say.
        on_disk = int8_network_sha256(Path(shipped_dir) / INT8_FILE)
        if on_disk is not None and measured.get("network_sha256") != on_disk:
            return (f"its record measured another int8 network than {INT8_FILE} (made anew since? run "
                    f"python -m training.engines)")
    return None


def candidates(setting: str, device: torch.device, record: dict | None, shipped_dir: Path | None = None,
               flip_tta: bool = False) -> list[str]:
    """Engines to try, in order; eager fp32 always closes the list."""
    if setting == AUTO:
        wanted = list(AUTO_ORDER[machine_kind(device)])
    else:
        wanted = [setting]
    chosen = []
    for engine in wanted:
        why = refusal(engine, device, record, shipped_dir, flip_tta)
        if why is None:
            chosen.append(engine)
        elif engine != EAGER:
            logger.warning("engine %s not served: %s", engine, why)
    return [e for e in chosen if e != EAGER] + [EAGER]


# ---- building an engine ------------------------------------------------------------------------
class _Forward(torch.nn.Module):
    """What gets compiled: the network, in bf16 for compile-bf16, answering float32.

    bf16 weights and activations throughout rather than bf16 autocast over fp32 weights: the same
    top-1 agreement with fp32 and ~8% more images/s (fewer casts between layers; benchmarks/RESULTS.md).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype
        # A copy: the fp32 network stays the reference and the fallback.
        self.model = copy.deepcopy(model).to(dtype) if dtype is not None else model

    def forward(self, x):
        if self.dtype is None:
            return self.model(x)
        return self.model(x.to(self.dtype)).float()


def _example(batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)


def _quantized(model: torch.nn.Module, calibration_images: torch.Tensor) -> torch.nn.Module:
    """PT2E static int8 (x86 inductor quantizer): observers see the calibration images, then convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    graph = torch.export.export(model, (_example(2, torch.device("cpu")),),
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calibration_images.split(64):
            prepared(chunk.contiguous(memory_format=torch.channels_last))
    return convert_pt2e(prepared)


def _openvino_package(model: torch.nn.Module, max_batch: int, path: Path) -> None:
    """The network as OpenVINO IR (``path`` .xml, its weights in the .bin beside), batch 1..max_batch."""
    import warnings

    import openvino as ov

    # OpenVINO traces the module (TorchScript); its torch.export route measured slower (shapes left
    # dynamic). The deprecation warning of that trace says nothing to an operator.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        converted = ov.convert_model(model, example_input=torch.randn(min(2, max_batch), 3, 32, 32),
                                     input=[ov.PartialShape([ov.Dimension(1, max_batch), 3, 32, 32])])
    ov.save_model(converted, str(path), compress_to_fp16=False)  # float32 weights: the engine picks its precision


class _OpenVINOForward:
    """An OpenVINO compiled model as a forward: float32 NCHW tensor -> float32 logits tensor.

    One stream, the worker's thread count, no CPU pinning: TorchServe runs several workers on the same
    cores, and OpenVINO's default pinning on Linux would put each of them on the same ones.
    """

    def __init__(self, precision: str, network, max_batch: int | None = None):
        """network: an IR's path, or an ov.Model already read."""
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        core = ov.Core()
        if isinstance(network, (str, os.PathLike)):
            network = core.read_model(str(network))
        if max_batch is not None:  # an IR made for another batch bound (the shipped int8 one)
            network.reshape(ov.PartialShape([ov.Dimension(1, max_batch), 3, 32, 32]))
        self._core, self._network, self._config = core, network, config
        self.compiled = core.compile_model(network, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._lone_request = None

    def lend_threads(self, threads: int) -> bool:
        """Calls with ``lone=True`` run on ``threads`` threads from now on (a second compiled model:
        OpenVINO fixes the thread count at compile time). False when that is no more than today's."""
        if threads <= self._config["INFERENCE_NUM_THREADS"]:
            return False
        compiled = self._core.compile_model(self._network, "CPU", {**self._config, "INFERENCE_NUM_THREADS": threads})
        self._lone_request = compiled.create_infer_request()
        return True

    def __call__(self, images: torch.Tensor, lone: bool = False) -> torch.Tensor:
        request = self._lone_request if lone and self._lone_request is not None else self.request
        # Engine hands it NCHW; infer() copies its output (share_outputs=False) so the next call keeps it.
        result = request.infer({0: images.contiguous().numpy()})
        return torch.from_numpy(result[0])


class _RecheckedForward:
    """openvino-int8's forward: the int8 network answers, fp32 answers again the close calls.

    Counts what it rechecked (``rechecked`` of ``answered`` images: the share is the price of the guard)."""

    def __init__(self, fast, exact, gap: float = RECHECK_LOGIT_GAP):
        self.fast, self.exact, self.gap = fast, exact, gap
        self.answered = self.rechecked = 0

    def __call__(self, images: torch.Tensor, lone: bool = False) -> torch.Tensor:
        logits = self.fast(images, lone=lone)
        close = self.close_calls(logits)
        if close.any():
            # A close call of a full batch stays on the worker's own threads: its neighbour is likely busy too.
            logits[close] = self.exact(images[close], lone=lone)
        self.count(len(images), int(close.sum()))
        return logits

    def close_calls(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows whose two largest logits are within ``gap``: the answers int8's rounding may have flipped."""
        top2 = logits.topk(2, dim=1).values
        return (top2[:, 0] - top2[:, 1]) < self.gap

    def count(self, answered: int, rechecked: int) -> None:
        self.answered += answered
        self.rechecked += rechecked

    def lend_threads(self, threads: int) -> bool:
        return all([self.fast.lend_threads(threads), self.exact.lend_threads(threads)])

    @property
    def share(self) -> float:
        """The share of the images answered so far that fp32 answered again."""
        return self.rechecked / max(1, self.answered)


def int8_made_for(network) -> str | None:
    """The weights' sha256 that training/quantize.py wrote into the int8 IR's rt_info."""
    if not network.has_rt_info(["cifar100", "weights_sha256"]):
        return None
    return network.get_rt_info(["cifar100", "weights_sha256"]).astype(str)


def _int8_engine(model: torch.nn.Module, weights_sha256: str, max_batch: int, device: torch.device,
                 folder: Path | None, shipped_dir: Path | None) -> "Engine":
    path = Path(shipped_dir) / INT8_FILE if shipped_dir is not None else None
    if path is None or not path.is_file():
        raise EngineError(f"no int8 network ({INT8_FILE}) beside the weights: python -m training.quantize makes it")
    import openvino as ov

    network = ov.Core().read_model(str(path))  # read, not compiled: other weights' IR is refused first
    if int8_made_for(network) != weights_sha256:
        raise EngineError(f"{INT8_FILE} was made from other weights: python -m training.quantize makes it anew")
    fast = _OpenVINOForward("f32", network, max_batch)  # f32: the layers NNCF left unquantized stay float32
    exact, info = load_or_compile("openvino-fp32", model, weights_sha256, max_batch, device, None, folder)
    return Engine(OPENVINO_INT8, _RecheckedForward(fast, exact), max_batch, info, torch.contiguous_format)


def _package_suffix(engine: str) -> str:
    return ".xml" if engine in OPENVINO else ".pt2"


def _compile_package(engine: str, model: torch.nn.Module, max_batch: int, device: torch.device,
                     calibration_images: torch.Tensor | None, path: Path) -> None:
    import torch._inductor.config as inductor_config

    if engine in OPENVINO:
        return _openvino_package(model, max_batch, path)
    if engine == "int8":
        if calibration_images is None:
            raise EngineError(f"int8 needs calibration images ({INPUTS_FILE})")
        module = _quantized(model, calibration_images)
    else:
        module = _Forward(model, torch.bfloat16 if engine == "compile-bf16" else None).eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = _example(min(2, max_batch) if max_batch > 1 else 1, device)
    with torch.no_grad():
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch} if max_batch > 1 else None,))
    # Freezing: weights become constants, so inductor folds them into its kernels (oneDNN's packed
    # weights on CPU); the x86 quantizer's int8 patterns need it too.
    with inductor_config.patch(freezing=True):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def network_code_sha256() -> str:
    """sha256 of model/network.py: the same weights through changed layers or BatchNorm folding are another
    package (how this file builds packages is PACKAGE_FORMAT's to say)."""
    import model.network

    return hashlib.sha256(Path(model.network.__file__).read_bytes()).hexdigest()


def cache_key(engine: str, weights_sha256: str, max_batch: int, device: torch.device,
              calibration_images: torch.Tensor | None) -> str:
    parts = {"engine": engine, "weights": weights_sha256, "torch": torch.__version__, "max_batch": max_batch,
             "machine": machine_description(device), "format": PACKAGE_FORMAT, "network_code": network_code_sha256()}
    if engine not in OPENVINO and device.type == "cpu":
        # inductor writes the thread count of the compiling process into its CPU kernels (`omp parallel
        # num_threads(N)`): a 2-thread package in a 1-thread worker oversubscribes the cores. OpenVINO's IR
        # holds no thread count (set when it is compiled at load): one IR serves every worker; nor do GPU kernels.
        parts["threads"] = torch.get_num_threads()
    if engine in OPENVINO:  # its converter writes the IR
        parts["openvino"] = _version("openvino")
    if engine == "int8":  # its quantizer makes the graph inductor compiles
        parts["torchao"] = _version("torchao")
    if engine == "int8" and calibration_images is not None:
        parts["calibration"] = hashlib.sha256(calibration_images.numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def cache_keep() -> int:
    return max(1, int(os.environ.get(ENGINE_CACHE_KEEP_ENV) or ENGINE_CACHE_KEEP))


TEMPORARY = ".tmp."  # in the name of a file being written (ENTRY.PID.tmp.SUFFIX), under the entry's lock


def _entry_files(meta: Path) -> list[Path]:
    """A cache entry's files but its .lock: a lock file stays for good (empty), so every worker locks the same one."""
    return [meta.with_suffix(".pt2"), meta.with_suffix(".xml"), meta.with_suffix(".bin"), meta]


def prune_cache(folder: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` most recently used packages (a load touches its .json), and the temporary
    files of a compile that was killed; a package whose lock another process holds (being compiled or loaded)
    is left alone. Returns the packages that went."""
    used = sorted((p for p in folder.glob("*.json") if TEMPORARY not in p.name),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for meta in used[keep:]:
        try:
            with open(meta.with_suffix(".lock"), "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                for path in _entry_files(meta):
                    path.unlink(missing_ok=True)
                removed.append(meta.stem)
        except BlockingIOError:
            continue
        except OSError as err:
            logger.warning("engine cache: could not prune %s: %s", meta.stem, err)
    for tmp in folder.glob(f"*{TEMPORARY}*"):
        # Written only under its entry's lock: a free lock means its writer is gone.
        try:
            with open(folder / f"{tmp.name.split('.')[0]}.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                tmp.unlink(missing_ok=True)
        except OSError:  # BlockingIOError: being written now
            continue
    if removed:
        logger.info("engine cache: removed %d old package(s), kept the %d most recently used", len(removed), keep)
    return removed


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another worker compiling the same package: wait for it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_package(engine: str, path: Path):
    if engine in OPENVINO:
        return _OpenVINOForward(OPENVINO[engine], path)
    return torch._inductor.aoti_load_package(str(path))


def load_or_compile(engine: str, model: torch.nn.Module, weights_sha256: str, max_batch: int,
                    device: torch.device, calibration_images: torch.Tensor | None = None,
                    folder: Path | None = None) -> tuple[object, dict]:
    """(the compiled callable, {"cached": bool, "seconds": float, "compile_seconds": float, "path": ...})."""
    folder = Path(folder or cache_dir())
    key = cache_key(engine, weights_sha256, max_batch, device, calibration_images)
    suffix = _package_suffix(engine)
    path, meta_path = folder / f"{engine}-{key}{suffix}", folder / f"{engine}-{key}.json"
    started = time.perf_counter()
    with _locked(folder / f"{engine}-{key}.lock"):
        cached = path.is_file() and meta_path.is_file()
        if cached:
            try:
                compiled = _load_package(engine, path)
                compile_seconds = json.loads(meta_path.read_text()).get("compile_seconds")
                os.utime(meta_path)  # most recently used: kept by prune_cache
            except Exception as err:  # noqa: BLE001 - damaged (a full disk, a copy cut short): compiled again
                logger.warning("engine cache: %s is damaged (%s: %s); compiling it again", meta_path.stem,
                               type(err).__name__, "".join(str(err).strip().splitlines()[-1:]))
                for damaged in _entry_files(meta_path):
                    damaged.unlink(missing_ok=True)
                cached = False
        if not cached:
            tmp = path.with_suffix(f".{os.getpid()}{TEMPORARY}{suffix.lstrip('.')}")
            _compile_package(engine, model, max_batch, device, calibration_images, tmp)
            if engine in OPENVINO:  # the IR's weights: same name, .bin (OpenVINO finds them by it)
                os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp, path)
            compile_seconds = round(time.perf_counter() - started, 2)
            meta = {"engine": engine, "compile_seconds": compile_seconds, "max_batch": max_batch,
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
            # Whole or not at all: a worker killed mid-write leaves a temporary file, not a damaged entry.
            tmp_meta = meta_path.with_suffix(f".{os.getpid()}{TEMPORARY}json")
            tmp_meta.write_text(json.dumps(meta) + "\n")
            os.replace(tmp_meta, meta_path)
            compiled = _load_package(engine, path)
    if not cached:
        prune_cache(folder, cache_keep())
    return compiled, {"cached": cached, "seconds": round(time.perf_counter() - started, 2),
                      "compile_seconds": compile_seconds, "path": str(path)}


# ---- the served engine -------------------------------------------------------------------------
@dataclass
class Engine:
    """A forward pass: normalized images [n, 3, 32, 32] -> float32 logits [n, classes]."""

    name: str
    forward: object
    max_batch: int | None = None   # compiled bound: larger inputs run in chunks
    info: dict = field(default_factory=dict)
    # The layout the forward reads: PyTorch's engines channels_last, OpenVINO's IR plain NCHW.
    memory_format: torch.memory_format = torch.channels_last
    lone_rows: int = 0  # batches this small run on lent threads (lend_threads); 0: none

    @property
    def rechecked(self) -> int:
        """Images answered again by fp32 so far (openvino-int8; 0 for the others)."""
        return getattr(self.forward, "rechecked", 0)

    def lend_threads(self, threads: int, rows: int) -> None:
        """A batch of at most ``rows`` rows (one image) runs on ``threads`` threads: OpenVINO's engines;
        the others keep the worker's threads (PyTorch's are one setting per process)."""
        lend = getattr(self.forward, "lend_threads", None)
        if lend is not None and lend(threads):
            self.lone_rows = rows
            self.info["lone_image_threads"] = threads

    def answer(self, images: torch.Tensor, flip_tta: bool) -> tuple[torch.Tensor, int, int]:
        """(logits, images through the forward pass, of them answered again by fp32) of one batch, with
        flip TTA or not: what a server runs and counts (the TorchServe handler, KServe's predictor)."""
        from model.tta import flip_tta_logits

        rechecked = self.rechecked
        if not flip_tta:
            logits = self(images)
        elif isinstance(self.forward, _RecheckedForward):
            logits = self._flip_tta_rechecked(images)
        else:
            logits = flip_tta_logits(self, images)
        return logits, len(images) * (2 if flip_tta else 1), self.rechecked - rechecked

    def _flip_tta_rechecked(self, images: torch.Tensor) -> torch.Tensor:
        """openvino-int8 with flip TTA: the close calls are the averaged logits'. Decided per view, the average of
        two views could be a close call neither view was: 98.90% agreement with fp32's flip TTA; decided on the
        average, 99.69% (benchmarks/RESULTS.md, session 48)."""
        from model.tta import flip_tta_logits

        forward = self.forward
        # A close call of a full batch stays on the worker's own threads, as without flip TTA.
        lone_rows = self.lone_rows if 2 * len(images) <= self.lone_rows else 0
        fast = Engine(self.name, forward.fast, self.max_batch, self.info, self.memory_format, self.lone_rows)
        exact = Engine(self.name, forward.exact, self.max_batch, self.info, self.memory_format, lone_rows)
        with torch.inference_mode():
            logits = flip_tta_logits(fast, images)
            close = forward.close_calls(logits)
            if close.any():
                logits[close] = flip_tta_logits(exact, images[close])
        forward.count(2 * len(images), 2 * int(close.sum()))
        return logits

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=self.memory_format)
        # Lone or not is the whole batch's say: its chunks and its rechecked close calls follow it.
        lone = {"lone": len(images) <= self.lone_rows} if self.lone_rows else {}
        with torch.inference_mode():
            if self.max_batch is None or len(images) <= self.max_batch:
                return self.forward(images, **lone)
            return torch.cat([self.forward(c.contiguous(memory_format=self.memory_format), **lone)
                              for c in images.split(self.max_batch)])


def build_engine(engine: str, model: torch.nn.Module, weights_sha256: str, max_batch: int,
                 device: torch.device, calibration_images: torch.Tensor | None = None,
                 folder: Path | None = None, shipped_dir: Path | None = None) -> Engine:
    """``shipped_dir``: the archive's (or the weights') folder, where openvino-int8 finds its network."""
    if engine == EAGER:
        return Engine(EAGER, model)
    if engine == OPENVINO_INT8:
        return _int8_engine(model, weights_sha256, max_batch, device, folder, shipped_dir)
    compiled, info = load_or_compile(engine, model, weights_sha256, max_batch, device, calibration_images, folder)
    layout = torch.contiguous_format if engine in OPENVINO else torch.channels_last
    return Engine(engine, compiled, max_batch, info, layout)


def probe_agreement(engine: Engine, reference: Engine | torch.Tensor, probe: torch.Tensor) -> float:
    """Share of the probe images on which ``engine`` gives eager fp32's top-1 (``reference``: the
    eager engine, or its top-1 answers as the record keeps them)."""
    expected = reference if isinstance(reference, torch.Tensor) else reference(probe).argmax(1)
    return float((engine(probe).argmax(1).cpu() == expected.cpu()).float().mean())


def probe_refusal(engine: Engine, reference: Engine, expected_top1: torch.Tensor | None, probe: torch.Tensor,
                  min_agreement: float = PROBE_MIN_AGREEMENT) -> str | None:
    """Why ``engine`` fails the start-up probe (None: it passes); records what it measured in ``engine.info``.
    ``expected_top1``: fp32's answers on ``probe`` as the record keeps them (None: ``reference`` runs)."""
    logits = engine(probe).float().cpu()
    if not bool(torch.isfinite(logits).all()):
        return f"it gives logits that are not finite (NaN or infinity) on {len(probe)} probe images"
    fp32 = reference(probe).float().cpu() if expected_top1 is None else None
    expected = fp32.argmax(1) if fp32 is not None else expected_top1.cpu()
    agreeing = int((logits.argmax(1) == expected).sum())
    engine.info["probe_agreement"] = round(agreeing / len(probe), 4)
    if agreeing < min_agreement * len(probe) - 1e-9:  # in counts: exactly at the line passes
        return (f"it agrees with fp32 on {100 * agreeing / len(probe):.1f}% of the {len(probe)} probe images "
                f"(needs {100 * min_agreement:.0f}%)")
    if engine.name in LOSSLESS:
        few = probe[:LOSSLESS_PROBE_IMAGES]
        limit = LOSSLESS_MAX_LOGIT_CHANGE["cpu" if probe.device.type == "cpu" else "cuda"]
        fp32_few = fp32[:len(few)] if fp32 is not None else reference(few).float().cpu()  # eager once, not twice
        change = float((logits[:len(few)] - fp32_few).abs().max())
        engine.info["probe_max_logit_change"] = float(f"{change:.2g}")
        if not change <= limit:
            return (f"its logits differ from fp32's by up to {change:.3g} on {len(few)} probe images (a lossless "
                    f"engine's by float rounding: at most {limit})")
    return None


def probe_sha256(images: torch.Tensor) -> str:
    """sha256 of the shipped probe's uint8 images: which probe a record's fp32 answers are of."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def load_inputs(model_dir: str | os.PathLike) -> dict | None:
    """The shipped training images ({"calibration", "probe": uint8 [n, 3, 32, 32]}), or None."""
    path = Path(model_dir) / INPUTS_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def load_record(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def select_engine(setting: str, model: torch.nn.Module, weights_sha256: str, max_batch: int,
                  device: torch.device, record: dict | None, inputs: dict | None,
                  normalize, folder: Path | None = None, build=build_engine,
                  shipped_dir: Path | None = None, flip_tta: bool = False) -> Engine:
    """The first candidate that builds and passes the probe; eager fp32 when none does (logged).

    ``build(name, model, weights_sha256, max_batch, device, calibration_images, folder, shipped_dir=)`` makes
    one engine.
    """
    reference = Engine(EAGER, model)
    tried = candidates(setting, device, record, shipped_dir, flip_tta)[:-1]  # the last is eager fp32: reference
    if tried:
        probe = normalize(inputs["probe"][:PROBE_IMAGES], device) if inputs else None
        calibration = normalize(inputs["calibration"]) if inputs else None
        # fp32's answers on the probe, from the record (training/engines.py) when it measured these very images
        # with these weights on a CPU (the record is the CPUs'): saves an eager pass over them at every start.
        measured = record or {}
        recorded = measured.get("probe_fp32_top1") or []
        same_probe = (inputs is not None and device.type == "cpu" and measured.get("weights_sha256") == weights_sha256
                      and measured.get("probe_sha256") == probe_sha256(inputs["probe"]))
        expected = torch.tensor(recorded[:len(probe)]) if same_probe and len(recorded) >= len(probe) else None
        close_calls = inputs is not None and inputs.get("probe_weights_sha256") == weights_sha256
    for name in tried:
        started = time.perf_counter()
        try:
            engine = build(name, model, weights_sha256, max_batch, device, calibration, folder, shipped_dir=shipped_dir)
            if probe is None:
                logger.warning("engine %s: no probe images (%s) in the archive; served unchecked", name, INPUTS_FILE)
            else:
                why = probe_refusal(engine, reference, expected, probe,
                                    PROBE_MIN_AGREEMENT if close_calls else OTHER_PROBE_MIN_AGREEMENT)
                if why is not None:
                    logger.error("engine %s refused: %s; broken on this machine? falling back", name, why)
                    continue
        except EngineError as err:  # a missing or mismatched part: said in a line, no traceback
            logger.warning("engine %s not served: %s", name, err)
            continue
        except Exception:  # noqa: BLE001 - a compiler failure must not keep the worker from serving
            logger.exception("engine %s could not be built; falling back", name)
            continue
        engine.info["start_seconds"] = round(time.perf_counter() - started, 2)
        return engine
    return reference


def serving_model(state_dict: dict) -> torch.nn.Module:
    """The network as the engines take it: eval mode, each BatchNorm folded into the convolution
    before it (model.network.fold_batchnorm), weights in channels_last.

    Same answers as the trained network up to float rounding (~1e-6 on the logits), in less time
    (benchmarks/RESULTS.md); fewer operators also mean fewer OpenMP wake-ups per request.
    """
    return fold_batchnorm(network_from_state_dict(state_dict)).to(memory_format=torch.channels_last)


def start(setting: str, model: torch.nn.Module, weights_sha256: str, max_batch: int, device: torch.device,
          model_dir: str | os.PathLike, calibration: Calibration, flip_tta: bool) -> tuple[Engine, Calibration]:
    """The engine a server starts with (``select_engine`` on the archive's record and probe images), and
    the calibration to serve with it: the engine's own refit when training/engines.py found it moved."""
    record = load_record(model_dir)
    engine = select_engine(setting, model, weights_sha256, max_batch, device, record, load_inputs(model_dir),
                           normalize, shipped_dir=Path(model_dir), flip_tta=flip_tta)
    refit = ((record or {}).get("engines", {}).get(engine.name) or {}).get("calibration") or {}
    # The refit is of the engine's plain logits (training/engines.py); flip TTA keeps its own fit.
    if refit.get("moved") and calibration.unsure_below is not None and not flip_tta:
        calibration = Calibration(float(refit["temperature"]), float(refit["unsure_threshold"]))
        logger.info("engine %s: calibration refit for it: %s", engine.name, calibration)
    return engine, calibration
