"""The project's command lines, one way: `python -m <module>` as the program name in usage lines
and every option's default in --help, the argparse types for numbers with a valid range, and the
command lines a message tells the user to run (this interpreter, as they type it).
Standard library only (the adapter uses it too)."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

# A help text that names its own default ("(default: torch's choice)") keeps it instead of the formatter's.
_OWN_DEFAULT = "(default:"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each help text; descriptions (module docstrings) keep their line breaks."""

    def _get_help_string(self, action):
        if _OWN_DEFAULT in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, module: str, description: str | None = None, **kwargs):
        super().__init__(prog=f"python -m {module}", description=description, formatter_class=_Formatter, **kwargs)

    def format_help(self) -> str:
        # Options without a help text would show no default: give them one that is only the default.
        # Identity, not ==: a default of 0 (--seed) equals False and must still be shown.
        for action in self._actions:
            if action.help is None and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
                action.help = "(default: %(default)s)"
        return super().format_help()


# ----------------------------------------------------------------------------- argparse types
# A number out of range is a one-line usage error when the command line is read, not a traceback
# minutes later (after the data load).
def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _ranged(kind, accepts, needs: str, name: str, doc: str):
    """An argparse type: a ``kind`` number that ``accepts``, else "needs <needs>, not <value>"."""
    def parse(text: str):
        value = _number(kind, text)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"needs {needs}, not {value if kind is int else format(value, 'g')}")
        return value
    parse.__name__, parse.__doc__ = name, doc
    return parse


positive_int = _ranged(int, lambda v: v >= 1, "1 or more", "positive_int",
                       "A whole number of 1 or more (epochs, a batch size, a width, a subset's size).")
positive_float = _ranged(float, lambda v: v > 0, "a number above 0", "positive_float",
                         "A number above 0 (a learning rate).")
non_negative_float = _ranged(float, lambda v: v >= 0, "0 or more", "non_negative_float",
                             "A number of 0 or more (a Beta alpha, where 0 means off; a weight decay).")
fraction = _ranged(float, lambda v: 0 <= v < 1, "0 <= x < 1", "fraction",
                   "A share in [0, 1): 1 would leave nothing (a dropout of 1 zeroes every activation).")
probability = _ranged(float, lambda v: 0 <= v <= 1, "0 <= p <= 1", "probability", "A probability in [0, 1].")
share = _ranged(float, lambda v: 0 < v <= 1, "0 < x <= 1", "share",
               "A part of a whole in (0, 1]: 1 is all of it (a client's share of a bound).")


# ----------------------------------------------------------------------------- commands a message gives
def typed_path(program: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str:
    """A program as a user in ``cwd`` (default: this process's) types it: relative when it lies inside
    (.venv/bin/python, README's way), else its full path."""
    path = Path(program)
    try:
        relative = path.relative_to(Path(cwd) if cwd is not None else Path.cwd())
    except ValueError:
        return str(path)
    return str(relative) if len(relative.parts) > 1 else f"./{relative}"


def python_command(cwd: str | os.PathLike | None = None) -> str:
    """This interpreter as typed (typed_path): plain `python` is the system's, without the packages."""
    return typed_path(sys.executable, cwd) if sys.executable else "python"


def module_command(module: str, *args: str | os.PathLike) -> str:
    """`<this interpreter> -m module args`, quoted for a shell: the command line a message tells the user to run."""
    return shlex.join([python_command(), "-m", module, *map(str, args)])
