"""Is a Java that TorchServe can run on here? Asked before starting it, so that a machine without
one fails at once with the fix instead of waiting minutes for a worker that never comes.

TorchServe's frontend is built for Java 17 ("Java 17 is required by Torchserve and older java
versions are not supported": TorchServe's troubleshooting guide); it runs ``$JAVA_HOME/bin/java``
when JAVA_HOME is set, else ``java`` from PATH, and so does this check.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

MIN_JAVA_VERSION = 17
FIX = "install it with `sudo make install-system` (Debian's openjdk-17-jre-headless)"


def java_command() -> str | None:
    """The java TorchServe would start, or None when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        path = os.path.join(java_home, "bin", "java")
        return path if os.access(path, os.X_OK) else None
    return shutil.which("java")


def parse_java_version(text: str) -> int | None:
    """The major version in ``java -version`` output ('openjdk version "17.0.15"' -> 17, '"1.8.0_392"' -> 8)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def java_problem() -> str | None:
    """Why TorchServe cannot start on this machine's Java (one line with the fix), or None when it can."""
    java = java_command()
    if java is None:
        where = f"JAVA_HOME={os.environ['JAVA_HOME']} has no bin/java" if os.environ.get("JAVA_HOME") else "no java on PATH"
        fix = "unset JAVA_HOME or point it at a Java installation" if os.environ.get("JAVA_HOME") else FIX
        return f"TorchServe needs Java {MIN_JAVA_VERSION} or newer, and there is none ({where}): {fix}"
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"TorchServe needs Java {MIN_JAVA_VERSION} or newer; `{java} -version` failed ({err}): {FIX}"
    version = parse_java_version(done.stderr + done.stdout)
    if version is None or version < MIN_JAVA_VERSION:
        found = f"Java {version}" if version is not None else "a Java whose version it cannot read"
        fix = (f"point JAVA_HOME at a Java {MIN_JAVA_VERSION} or newer, or unset it to use the java on PATH"
               if os.environ.get("JAVA_HOME") else FIX)
        return f"TorchServe needs Java {MIN_JAVA_VERSION} or newer; {java} is {found}: {fix}"
    return None
