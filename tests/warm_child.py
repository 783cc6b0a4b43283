"""Python scripts run each in a process of its own, forked from one that imported the slow modules once.

A child that imports handler.kserve_predictor spends ~3.5 s of 2 cores on torch and KServe before its script
runs (19 such children in tests/test_kserve_predictor.py: over a minute of the suite). Forked from a process
that imported them, a script starts at once, in a copy of that process: its own globals, event loop and
metrics, nothing left by the script before. For tests whose process must not import these modules
(tests/kserve_types.py registers a bare ``kserve`` package).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The forking process: imports the modules named on its command line, then for each job (a JSON line on its stdin)
# forks a child that runs the job's script with its stdout and stderr in the job's files, and answers the child's
# exit code (a JSON line; "timeout" when it was killed at the job's deadline).
_SERVER = r"""
import json, linecache, os, sys, time, traceback
for name in sys.argv[1:]:
    __import__(name)
answers = os.fdopen(os.dup(1), "w")
while line := sys.stdin.readline():
    job = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            linecache.cache["<script>"] = (len(job["script"]), None, job["script"].splitlines(True), "<script>")
            exec(compile(job["script"], "<script>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + job["timeout"]
    while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    answers.write(json.dumps(os.waitstatus_to_exitcode(ended[1]) if ended[0] else "timeout") + "\n")
    answers.flush()
"""


class WarmChild:
    """``run(script)`` as ``subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True,
    text=True)`` would, with ``modules`` imported before the script starts."""

    def __init__(self, modules: list[str], cwd: Path):
        self._folder = tempfile.TemporaryDirectory(prefix="warm-child-")
        self._log = Path(self._folder.name) / "server.log"
        with self._log.open("w") as log:
            self._server = subprocess.Popen([sys.executable, "-c", _SERVER, *modules], cwd=cwd, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def run(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
        out, err = (Path(self._folder.name) / name for name in ("out", "err"))
        self._server.stdin.write(json.dumps({"script": script, "out": str(out), "err": str(err),
                                             "timeout": timeout}) + "\n")
        self._server.stdin.flush()
        answer = self._server.stdout.readline()
        if not answer:
            raise RuntimeError(f"the forking process ended: {self._log.read_text()[-2000:]}")
        code = json.loads(answer)
        if code == "timeout":
            raise subprocess.TimeoutExpired(["<script>"], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(["<script>"], code, out.read_text(), err.read_text())

    def close(self) -> None:
        self._server.stdin.close()
        try:
            self._server.wait(30)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()
        self._folder.cleanup()

    def __enter__(self) -> "WarmChild":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
