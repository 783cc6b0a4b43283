"""The one error type the adapter answers with: an HTTP status and a plain-words message.

Every refusal leaves the adapter in the seed's shape, `{"error": "..."}`.
"""
from __future__ import annotations


class ClassifyError(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None,
                 relayed: bool = False):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers  # e.g. Retry-After on a 503 that a later try may pass
        # The model server's own refusal passed on (its 413, a 4xx, no explanations): not one the adapter made
        # itself, so not in adapter_refusals_total.
        self.relayed = relayed
