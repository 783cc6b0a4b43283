"""A stand-in server for benchmarks/side_by_side.py's tests: no process, only the order it came up and went down in
(standard library only: the interrupt test's own process imports it too)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def stand_in_server(name: str, events: list, start=lambda: None) -> Iterator[str]:
    """``start()``, then up until the end ("<name> up" / "<name> down" in ``events``)."""
    start()
    events.append(f"{name} up")
    try:
        yield name
    finally:
        events.append(f"{name} down")
