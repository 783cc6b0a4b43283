"""Ctrl-C for a command a test starts, as a terminal gives it: the child's SIGINT at its default disposition, and
the exit codes that mean "stopped by Ctrl-C"."""
from __future__ import annotations

import signal


def sigint_as_in_a_terminal() -> None:
    """Popen's preexec_fn. A background job (`.ci/run &`, as CI runs the tests) starts its children with SIGINT
    ignored, and Python then never raises KeyboardInterrupt: the child gets the default, as a terminal's Ctrl-C
    finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stopped_by(signum: int) -> tuple[int, ...]:
    """The exit codes (Popen's returncode) of a command that stopped cleanly on `signum`: 128 + signum, which our
    commands return. For SIGINT also death by SIGINT (-2; a shell shows 130 for both): CPython 3.11 ends a process
    so, after all its cleanup, when the KeyboardInterrupt passed through exec() of a string on its way to the
    handler that caught it (dataclasses build their methods so: seen when Ctrl-C met the first import of h11)."""
    return (128 + signum, -signum) if signum == signal.SIGINT else (128 + signum,)
