"""Pure computations a test session will need, started with the session in child processes at the lowest CPU
priority (nice 19): they run on the core the tests leave idle (about half the time on 2 cores: most tests wait on
servers) instead of holding the tests up when first asked for. A result is what the test process would have
computed; a test that asks before it is done waits for it (the tests then leave the cores to it).

tests/conftest.py starts those the selected tests need (``COMPUTATIONS``, by the fixture that returns each: it
calls ``result``) and stops any left at the end. Each runs as ``python tests/background.py NAME DATA_DIR OUT``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT_TIMEOUT_S = 900  # the longest is ~1 min alone on 2 cores


def shipped_test_split_logits(data_dir: str):
    """(plain logits, flip-TTA logits, labels) of the shipped weights' served network on the whole test split."""
    from serving.archive import DEFAULT_WEIGHTS
    from training.calibrate import logits_on_test_split

    return logits_on_test_split(DEFAULT_WEIGHTS, data_dir)


def nncf_cpu_extension(data_dir: str) -> bool:
    """NNCF's C++ quantization functions for the CPU, compiled into torch's extension cache (~20 s of g++ on a fresh
    machine, at training.quantize's first use; later loads find it built, or wait on its lock while it builds)."""
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader

    QuantizedFunctionsCPULoader.load()
    return True


def width10_reference_probs(data_dir: str):
    """The width-10 network's in-process answers (flip TTA, as its card serves it) to test_width10_model's images:
    its engine is built here (~25 s on 2 cores) for the served worker, not in the test nor in the worker."""
    from serving_helpers import ReferenceModel
    from test_width10_model import N_IMAGES, WEIGHTS, served_model_config
    from training.data import load_split

    images, _ = load_split(data_dir, train=False)
    return ReferenceModel(WEIGHTS, config=served_model_config()).probs_of_uint8(images[:N_IMAGES])


COMPUTATIONS = {"shipped_test_split_logits": shipped_test_split_logits, "nncf_cpu_extension": nncf_cpu_extension,
                "width10_reference_probs": width10_reference_probs}


class Background:
    """One computation running in a child process; ``result()`` waits for it and loads what it saved."""

    def __init__(self, name: str, data_dir: str):
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"background-{name}-"))
        self.out, self.log = self.folder / "result.pt", self.folder / "output.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, __file__, name, data_dir, str(self.out)], cwd=REPO,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self._result = None

    def result(self):
        import torch

        if self._result is None:
            try:
                code = self.process.wait(WAIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{self.name}: not done in {WAIT_TIMEOUT_S} s in the background") from None
            assert code == 0, f"{self.name} in the background failed ({code}):\n{self.log.read_text()[-3000:]}"
            self._result = torch.load(self.out, weights_only=True)
        return self._result

    def stop(self) -> None:
        """Ends the child if it still runs (a session cut short) and removes its folder."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder)


RUNNING: dict[str, Background] = {}


def start(names, data_dir: str) -> None:
    for name in names:
        if name not in RUNNING:
            RUNNING[name] = Background(name, data_dir)


def result(name: str, data_dir: str):
    """``name``'s result, started now if the session did not start it."""
    start([name], data_dir)
    return RUNNING[name].result()


def stop_all() -> None:
    for computation in RUNNING.values():
        computation.stop()
    RUNNING.clear()


def main(name: str, data_dir: str, out: str) -> None:
    os.nice(19)  # first: the tests come before this
    import torch

    sys.path.insert(0, str(REPO))
    value = COMPUTATIONS[name](data_dir)
    partial = Path(out).with_suffix(".partial")
    torch.save(value, partial)
    partial.rename(out)  # whole or absent


if __name__ == "__main__":
    main(*sys.argv[1:])
