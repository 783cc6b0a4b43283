"""The request being answered, as the code under it sees it: its X-Request-ID (sent on to the model
server), the model version that answered (for the request's log line), and for its count in the metrics
whether it passes on the model server's refusal and which cap refused it busy. Set by adapter/edge.py
for each request; a ContextVar, so concurrent requests each see their own."""
from __future__ import annotations

from contextvars import ContextVar

# adapter/edge.py's record of the request (request_id, model_version, relayed, busy_cap, ...); None outside a
# request (the /health probe's task).
CURRENT: ContextVar[dict | None] = ContextVar("adapter_request", default=None)


def request_id_header() -> dict[str, str]:
    current = CURRENT.get()
    return {"X-Request-ID": current["request_id"]} if current else {}


def _note(key: str, value) -> None:
    current = CURRENT.get()
    if current is not None:
        current[key] = value


def note_busy(cap: str) -> None:
    """The request is refused busy (503 + Retry-After) by ``cap`` (adapter/metrics.py BUSY_CAPS, or GAVE_WAY)."""
    _note("busy_cap", cap)


def note_relayed() -> None:
    """The answer passes on the model server's own refusal (ClassifyError.relayed)."""
    _note("relayed", True)


def note_model_version(version) -> None:
    if version is not None:
        _note("model_version", str(version))
