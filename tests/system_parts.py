"""What the integration tests need besides Python, by the fixture that needs it, and what to say
when it is missing. A missing part that `make install-system` or `make install` provides fails the
run with the fix (tests/conftest.py); none is skipped. A GPU is the only part allowed to be absent.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from serving.java import java_problem

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"
SYSTEM = "`sudo make install-system`"


def chromium_problem() -> str | None:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return None
    return f"The page tests need Chromium at {CHROMIUM} (env CHROMIUM): install it with {SYSTEM}"


def wrk_problem() -> str | None:
    if shutil.which("wrk") or Path("/usr/bin/wrk").exists():
        return None
    return f"The benchmarks' tests need wrk (their load generator): install it with {SYSTEM}"


def axe_problem() -> str | None:
    if AXE.is_file():
        return None
    npm = "" if shutil.which("npm") else f"npm is missing too ({SYSTEM} installs it); then "
    return f"The accessibility test needs axe-core at {AXE}: {npm}run `make test` (it runs npm ci: package-lock.json)"


# fixture name -> the check that says what is missing (None: present)
PROBLEMS: dict[str, Callable[[], str | None]] = {
    "torchserve": java_problem, "kserve_ts": java_problem, "browser": chromium_problem,
    "wrk": wrk_problem, "axe_script": axe_problem,
}


def missing_parts(fixture_names: set[str]) -> list[str]:
    """One line per missing part that these fixtures need."""
    checks = {PROBLEMS[name] for name in fixture_names if name in PROBLEMS}
    return sorted({problem for check in checks if (problem := check()) is not None})
