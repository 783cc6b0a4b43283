"""How long a client may take to send a request: Apache mod_reqtimeout's MinRate. One rule for the
adapter's heads and bodies (adapter/protocol.py, adapter/limits.py) and KServe's predictor's bodies
(handler/kserve_predictor.py); the defaults are serving/settings.py's. And how a wait for a client's bytes ends
early: when its request gives way to another client's (max-min fairness, serving/clients.py)."""
from __future__ import annotations

import asyncio


def paced_deadline(started: float, received: int, limit_s: float, grace_s: float, min_rate: float) -> float:
    """When the next bytes must have arrived: never later than ``limit_s`` after ``started``, and, once
    ``grace_s`` has passed, each byte received so far buys 1/``min_rate`` s (a client slower than
    ``min_rate`` bytes/s on average runs out)."""
    return min(started + limit_s, started + grace_s + received / min_rate)


def stop_now(timer: asyncio.Timeout) -> None:
    """Ends ``timer``'s wait at once (TimeoutError in its task), unless it has expired already (then its
    TimeoutError is on its way): a body or message that gives way stops waiting for its client's bytes."""
    if not timer.expired():
        timer.reschedule(-1)  # a time past: as soon as the loop runs
