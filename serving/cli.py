"""The project's command lines, one way: `python -m <module>` as the program name in usage lines
and every option's default in --help, and the argparse types for numbers with a valid range.
Standard library only (the adapter uses it too)."""
from __future__ import annotations

import argparse
import math

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


def positive_int(text: str) -> int:
    """A whole number of 1 or more (epochs, a batch size, a width, a subset's size)."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs 1 or more, not {value}")
    return value


def positive_float(text: str) -> float:
    """A number above 0 (a learning rate)."""
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"needs a number above 0, not {value:g}")
    return value


def non_negative_float(text: str) -> float:
    """A number of 0 or more (a Beta alpha, where 0 means off; a weight decay)."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"needs 0 or more, not {value:g}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1): 1 would leave nothing (a dropout of 1 zeroes every activation)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"needs 0 <= x < 1, not {value:g}")
    return value


def probability(text: str) -> float:
    """A probability in [0, 1]."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"needs 0 <= p <= 1, not {value:g}")
    return value
