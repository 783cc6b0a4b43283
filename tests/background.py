"""Pure computations a test session will need, started with the session in child processes at the lowest CPU
priority (nice 19): they run on the core the tests leave idle (about half the time on 2 cores: most tests wait on
servers) instead of holding the tests up when first asked for. A result is what the test process would have
computed; a test that asks before it is done waits for it (the tests then leave the cores to it).

A computation ``f(data_dir)`` is registered (``@background.computation(name)``) by the test module or conftest that
has the fixture ``name`` returning ``result(name, ...)``; tests/conftest.py starts those the selected tests need and
stops any left at the end. Each runs as ``python tests/background.py MODULE:FUNCTION DATA_DIR OUT``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT_TIMEOUT_S = 900  # the longest is ~1 min alone on 2 cores

# fixture name -> "module:function" the child imports and calls with the data folder (a function of a test module,
# importable by its name from tests/: the module's own top-level code must be pure)
COMPUTATIONS: dict[str, str] = {}


def computation(name: str):
    """Registers the decorated ``function(data_dir)`` as the computation behind the fixture ``name``."""
    def register(function):
        target = f"{function.__module__}:{function.__name__}"
        if COMPUTATIONS.setdefault(name, target) != target:
            raise ValueError(f"background computation {name!r} is {COMPUTATIONS[name]} already, not {target}")
        return function
    return register


class Background:
    """One computation running in a child process; ``result()`` waits for it and loads what it saved."""

    def __init__(self, name: str, data_dir: str):
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"background-{name}-"))
        self.out, self.log = self.folder / "result.pt", self.folder / "output.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, __file__, COMPUTATIONS[name], data_dir, str(self.out)],
                                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
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


def main(target: str, data_dir: str, out: str) -> None:
    os.nice(19)  # first: the tests come before this
    import importlib

    import torch

    sys.path.insert(0, str(REPO))
    module, function = target.split(":")
    value = getattr(importlib.import_module(module), function)(data_dir)
    partial = Path(out).with_suffix(".partial")
    torch.save(value, partial)
    partial.rename(out)  # whole or absent


if __name__ == "__main__":
    main(*sys.argv[1:])
