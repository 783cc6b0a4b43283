"""A copy of this checkout for the tests that run the README's make targets (`make serve`, `make serve-kserve`,
`make stop`): they write the checkout's logs/, key_file.json, model_store/ and dist/ as a user's run does, so
they run in a copy of it and leave a service the user started in this one alone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from serving.process import free_ports

REPO = Path(__file__).resolve().parents[1]
# Shared with this checkout, not copied: the environment (large; make's install stamps inside it) and the
# engine cache (a warm start, as in this checkout: packages are locked while in use, handler/engine.py).
SHARED = (".venv", ".cache")


def tracked_files(repo: Path = REPO) -> list[str]:
    """The files git tracks, with what is new and not ignored; every file when this is no git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                                capture_output=True, check=True, timeout=60).stdout
        return [name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        return [str(path.relative_to(repo)) for path in repo.rglob("*")
                if path.is_file() and not any(part in SHARED or part == ".git" for part in path.relative_to(repo).parts)]


def copy_of_checkout(into: Path, repo: Path = REPO) -> Path:
    """``into`` made a copy of ``repo``'s files, their times kept (make compares them with the environment's
    install stamp), with the environment and the engine cache linked, not copied."""
    for name in tracked_files(repo):
        source, target = repo / name, into / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for name in SHARED:
        (repo / name).mkdir(exist_ok=True)
        os.symlink(repo / name, into / name)
    return into


class Commands:
    """The README's commands, run in a checkout (``root``) with ``env`` as a user's shell has it."""

    def __init__(self, root: Path, env: dict[str, str], make_timeout_s: float):
        self.root, self.env, self.make_timeout_s = root, env, make_timeout_s

    def python(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        """``python -m ...`` (this environment's) from the checkout's root, ``env`` over the shell's."""
        return subprocess.run([sys.executable, "-m", *args], cwd=self.root,
                              env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)

    def status(self, *module: str) -> int:
        """``python -m <module> status``'s exit code: 0 running, 3 not running."""
        return self.python(*module, "status").returncode

    def make(self, target: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", target, *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=self.make_timeout_s)


def user_in_a_copy(into: Path, port_variables: list[str], make_timeout_s: float) -> Commands:
    """A user's shell (no PYTHONPATH) in a copy of this checkout made in ``into``, a free port in each of
    ``port_variables``."""
    env = {**os.environ, **{variable: str(port) for variable, port in
                            zip(port_variables, free_ports(len(port_variables)))}}
    env.pop("PYTHONPATH", None)
    return Commands(copy_of_checkout(into), env, make_timeout_s)
