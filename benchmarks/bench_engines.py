"""In-process images/s of every engine (handler/engine.py) this machine allows, side by side.

    python -m benchmarks.bench_engines [--widths 3 10] [--seconds 2] [--rounds 2] [--emulate-isa avx2] [--device cuda]

Batch 6 on 2 threads (one worker's batch with the cores to itself), batch 6 on 1 thread (each of
the two shipped workers' batches under load, one core each: the served layout) and batch 1 on 1
thread (a lone request in one of two workers); width 3 is the shipped weights, width 10 the seed's network
with random weights (speed only). Engines are built through the same cache as TorchServe's
workers (the first run compiles; its seconds are printed as the cold start, a load from the
cache as the warm one). Engines run alternately, best round kept: a shared machine drifts. The
inputs are the first 1,200 CIFAR-100 test images in turn (random pixels where the data is absent):
openvino-int8's speed depends on how many close calls it rechecks, printed beside it with its int8 network alone
(not servable: what the rechecks, the accuracy guard, cost).

``--emulate-isa avx2`` (or ``avx512-vnni``) runs it again with oneDNN (PyTorch's and OpenVINO's) and
ATen capped to that instruction set: the kernels an AVX2-only CPU (no VNNI, no bf16) or an AVX-512
one without bf16 would run, on this machine's cores and caches. A proxy, said so in its output: the
cores, caches and clocks of such a CPU still differ.

``--device cuda`` measures the engines a GPU worker can run (eager fp32, compile-fp32, compile-bf16) at
batch 6 and batch 1 (threads do not apply), each call's logits copied back to the CPU as a server's are.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import time

import torch

from handler import engine as engines
from handler.engine import serving_model
from model.network import CIFAR100Model
from model.shipped import SHIPPED_WEIGHTS, SHIPPED_WEIGHTS_DIR
from model.normalization import normalize
from serving.torchserve import DEFAULT_ENGINE_CACHE
from serving import cli
from training.runtime import DEVICE_HELP, device_argument, pick_device

POINTS = ((6, 2), (6, 1), (1, 1))  # (batch, threads)
GPU_POINTS = ((6, None), (1, None))  # a GPU worker's batches: threads do not apply
MAX_BATCH = 6
# --emulate-isa: (oneDNN's ONEDNN_MAX_CPU_ISA, ATen's ATEN_CPU_CAPABILITY, which inductor follows too)
EMULATED_ISA = {"avx2": ("AVX2", "avx2"), "avx512-vnni": ("AVX512_CORE_VNNI", "avx512")}


def network(width: int, device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, str]:
    """(serving model, weights digest): the shipped weights for width 3, seeded random ones else."""
    if width == 3:
        data = SHIPPED_WEIGHTS.read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        torch.manual_seed(0)
        state = CIFAR100Model(width=width, num_classes=100).state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    return serving_model(state).to(device), hashlib.sha256(data).hexdigest()


def rate(engine: engines.Engine, batches: list[torch.Tensor], seconds: float) -> float:
    """images/s over ``batches`` in turn (real images: openvino-int8's rechecks depend on them)."""
    # .cpu(): what a server pays for each answer (on a GPU it waits for the forward pass; on a CPU a no-op).
    for x in batches[:3]:
        engine(x).cpu()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine(batches[n % len(batches)]).cpu()
        n += 1
    return n * len(batches[0]) / (time.perf_counter() - started)


def test_images(count: int = 1200) -> torch.Tensor:
    """The first ``count`` CIFAR-100 test images (uint8), or random pixels where the data is absent."""
    from training.data import default_data_dir, load_split

    try:
        return load_split(default_data_dir(), train=False)[0][:count]
    except Exception as err:  # noqa: BLE001 - speed can still be measured without the data
        print(f"no CIFAR-100 test split ({err}): random pixels (openvino-int8 rechecks more of those)")
        return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser("benchmarks.bench_engines", __doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--engines", nargs="+", default=list(engines.ENGINES), choices=engines.ENGINES)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--emulate-isa", choices=sorted(EMULATED_ISA),
                        help="cap oneDNN and ATen to this instruction set (a proxy for such a CPU)")
    parser.add_argument("--device", default="cpu", type=device_argument, help=DEVICE_HELP)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.emulate_isa and device.type != "cpu":
        parser.error("--emulate-isa caps a CPU's instruction set: it needs --device cpu")
    if args.emulate_isa:
        onednn, aten = EMULATED_ISA[args.emulate_isa]
        if os.environ.get(engines.ONEDNN_ISA_ENV) != onednn:
            # Both caps are read when the libraries load: run again in a fresh process with them set.
            os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_engines", *(argv or sys.argv[1:])],
                      {**os.environ, engines.ONEDNN_ISA_ENV: onednn, "ATEN_CPU_CAPABILITY": aten})
        print(f"PROXY: oneDNN capped to {onednn}, ATen to {aten}, on the CPU below (not such a CPU itself)")
    inputs = engines.load_inputs(SHIPPED_WEIGHTS_DIR)
    calibration = normalize(inputs["calibration"])
    images = normalize(test_images(), device)
    points = POINTS if device.type == "cpu" else GPU_POINTS
    print(f"{'CPU' if device.type == 'cpu' else 'GPU'}: {engines.machine_description(device)}; torch {torch.__version__}")
    for width in args.widths:
        model, digest = network(width, device)
        built_for = {}  # threads -> {engine: Engine}: inductor writes the thread count into its kernels
        for threads in sorted({threads for _, threads in points}, key=lambda t: t or 0):
            if threads:
                torch.set_num_threads(threads)
            built_for[threads] = {}
            for name in args.engines:
                if engines.machine_refusal(name, device):
                    continue
                started = time.perf_counter()
                try:
                    engine = engines.build_engine(name, model, digest, MAX_BATCH, device, calibration,
                                                  DEFAULT_ENGINE_CACHE, shipped_dir=SHIPPED_WEIGHTS_DIR)
                except engines.EngineError as err:  # openvino-int8 for random weights: no int8 network made for them
                    print(f"width {width} {name}: not built: {err}")
                    continue
                built_for[threads][name] = engine
                if name == engines.EAGER:
                    continue  # nothing compiled
                print(f"width {width} {name}{f' for {threads} thread(s)' if threads else ''}: "
                      f"{'loaded from the cache' if engine.info.get('cached') else 'compiled'} in "
                      f"{time.perf_counter() - started:.1f} s (cold compile: {engine.info.get('compile_seconds', 0)} s)",
                      flush=True)
        for batch, threads in points:
            if threads:
                torch.set_num_threads(threads)
            built = built_for[threads]
            batches = list(images.split(batch))[:len(images) // batch]
            # openvino-int8's int8 network alone, beside it: what its rechecks (the accuracy guard) cost.
            int8 = built.get(engines.OPENVINO_INT8)
            alone = int8 and engines.Engine("int8 alone", int8.forward.fast, int8.max_batch,
                                            memory_format=int8.memory_format)
            best = {name: 0.0 for name in built}
            best_alone = 0.0
            for _ in range(args.rounds):
                for name, engine in built.items():
                    best[name] = max(best[name], rate(engine, batches, args.seconds))
                if alone:
                    best_alone = max(best_alone, rate(alone, batches, args.seconds))
            base = best.get(engines.EAGER)  # the ratios' base: none without eager-fp32 among --engines

            def versus_eager(value: float) -> str:
                return f" ({value / base:.2f}x)" if base else ""

            print(f"width {width}, batch {batch}{f', {threads} thread(s)' if threads else ''}: " + ", ".join(
                f"{name} {value:,.0f} img/s{versus_eager(value)}" for name, value in best.items()), flush=True)
            if alone:
                print(f"  {engines.OPENVINO_INT8}: {int8.forward.share:.1%} of the images rechecked by fp32 (close "
                      f"calls); its int8 network alone, not servable: {best_alone:,.0f} img/s{versus_eager(best_alone)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
