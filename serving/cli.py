"""The project's command lines, one way: `python -m <module>` as the program name in usage lines
and every option's default in --help. Standard library only (the adapter uses it too)."""
from __future__ import annotations

import argparse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each help text; descriptions (module docstrings) keep their line breaks."""


class Parser(argparse.ArgumentParser):
    def __init__(self, module: str, description: str | None = None, **kwargs):
        super().__init__(prog=f"python -m {module}", description=description, formatter_class=_Formatter, **kwargs)

    def format_help(self) -> str:
        # Options without a help text would show no default: give them one that is only the default.
        for action in self._actions:
            if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"
        return super().format_help()
