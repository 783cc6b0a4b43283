"""The Java check before TorchServe starts: a machine without Java (or with an old one) fails at
once with the fix, instead of waiting minutes for a worker that never becomes READY.

The "old Java" below is a two-line script that answers `-version` like Java 11 does: the one
stand-in here, since only Java 17 is installed on this machine.
"""
from __future__ import annotations

import stat
import time

import pytest

from serving.java import MIN_JAVA_VERSION, java_problem, parse_java_version
from serving.torchserve import TorchServeError, TorchServeInstance


@pytest.mark.parametrize("text, version", [
    ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('java version "1.8.0_392"', 8),
    ('openjdk version "11.0.22" 2024-01-16', 11),
    ("bash: java: command not found", None),
])
def test_java_version_is_read_from_its_banner(text, version):
    assert parse_java_version(text) == version


def test_no_java_on_path_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    problem = java_problem()
    assert problem is not None and "no java on PATH" in problem and "sudo make install-system" in problem


def test_java_home_without_java_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    problem = java_problem()
    assert problem is not None and f"JAVA_HOME={tmp_path / 'jdk'} has no bin/java" in problem


def test_an_old_java_is_refused_with_its_version(tmp_path, monkeypatch):
    fake = tmp_path / "java"
    fake.write_text('#!/bin/sh\necho \'openjdk version "11.0.22" 2024-01-16\' >&2\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = java_problem()
    assert problem is not None
    assert f"needs Java {MIN_JAVA_VERSION} or newer" in problem and "is Java 11" in problem
    assert "sudo make install-system" in problem


def test_an_old_java_under_java_home_names_java_home(tmp_path, monkeypatch):
    """JAVA_HOME wins over PATH (as TorchServe's start): installing Java 17 would not help, so the fix says so."""
    (tmp_path / "jdk" / "bin").mkdir(parents=True)
    fake = tmp_path / "jdk" / "bin" / "java"
    fake.write_text('#!/bin/sh\necho \'java version "1.8.0_392"\' >&2\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    problem = java_problem()
    assert problem is not None and "is Java 8" in problem
    assert "JAVA_HOME" in problem and "sudo make install-system" not in problem


def test_torchserve_start_without_java_fails_at_once(tmp_path, monkeypatch):
    """The real start path (what `make serve` runs): refused before anything is launched."""
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    ts = TorchServeInstance.on_free_ports(tmp_path / "ts", model_store=tmp_path / "store")
    started = time.monotonic()
    with pytest.raises(TorchServeError, match="sudo make install-system"):
        ts.start()
    assert time.monotonic() - started < 10
    assert not ts.is_running()


@pytest.mark.integration  # make test-unit runs without Java
def test_this_machines_java_passes():  # a missing Java fails here with the fix (make install-system)
    assert java_problem() is None
