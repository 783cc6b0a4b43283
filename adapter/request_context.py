"""The request being answered, as the code under it sees it: its X-Request-ID (sent on to the model
server) and the model version that answered (for the request's log line). Set by adapter/edge.py
for each request; a ContextVar, so concurrent requests each see their own."""
from __future__ import annotations

from contextvars import ContextVar

# {"request_id": str, "model_version": str | None}; None outside a request (the /health probe's task).
CURRENT: ContextVar[dict | None] = ContextVar("adapter_request", default=None)


def request_id_header() -> dict[str, str]:
    current = CURRENT.get()
    return {"X-Request-ID": current["request_id"]} if current else {}


def note_busy(cap: str) -> None:
    """The request is refused busy (503 + Retry-After) by ``cap`` (adapter/metrics.py BUSY_CAPS)."""
    current = CURRENT.get()
    if current is not None:
        current["busy_cap"] = cap


def note_relayed() -> None:
    """The answer passes on the model server's own refusal (ClassifyError.relayed)."""
    current = CURRENT.get()
    if current is not None:
        current["relayed"] = True


def note_model_version(version) -> None:
    current = CURRENT.get()
    if current is not None and version is not None:
        current["model_version"] = str(version)
