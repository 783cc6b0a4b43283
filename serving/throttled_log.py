"""A logger's warnings at most once a second, with the count of those left out: a flood of refused requests
(slow, busy, malformed) must not cost a log write each. Used by the adapter's limits and KServe's predictor."""
from __future__ import annotations

import logging
import time


class ThrottledLog:
    """One warning per `interval_s` at most, with the count of those left out: an attack's thousands
    of refusals must not cost a log write each."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0):
        self.logger = logger
        self.interval_s = interval_s
        self._next = 0.0
        self._left_out = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            message += f" (and {self._left_out} more like it in the last {self.interval_s:g} s)"
        self._next = now + self.interval_s
        self._left_out = 0
        self.logger.warning(message, *args)
