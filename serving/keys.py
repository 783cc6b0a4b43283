"""TorchServe's token keys, read from its key_file.json (torch-free; the adapter uses it too).

TorchServe (token authorization on, its default) writes key_file.json into the working directory
it was started from:
    {"management": {"key": "...", "expiration time": "2024-02-16T21:12:24.801167Z"},
     "inference":  {"key": "...", "expiration time": "..."},
     "API":        {"key": "..."}}
Inference and management keys expire after `token_expiration_min`; the API key renews them with
`PUT <management>/token?type=inference|management`, which rewrites the file. Callers therefore never
cache a key for long: they re-read the file when it changed, and renew when a key is rejected
(``is_auth_refusal``: the one rule for "rejected", used by the adapter and by make rollout): if the
file still holds the refused key, ``KeyFile.renew``; then the call is retried once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY_FILE_ENV = "TS_KEY_FILE"


def is_auth_refusal(status_code: int, text: str) -> bool:
    """TorchServe's answer to a missing, expired or wrong key: 401, or (TorchServe 0.12) 400 whose
    body names InvalidKeyException."""
    if status_code == 401:
        return True
    return status_code == 400 and "InvalidKeyException" in text


class KeyFileError(RuntimeError):
    """The key file is missing or unreadable (TorchServe not started, or started elsewhere)."""


@dataclass(frozen=True)
class Keys:
    inference: str
    management: str
    api: str


class KeyFile:
    """Reads key_file.json, re-reading it only when its modification time changes."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path or os.environ.get(KEY_FILE_ENV, "key_file.json"))
        self._stamp: tuple[int, int] | None = None
        self._keys: Keys | None = None

    def load(self) -> Keys:
        try:
            st = self.path.stat()
        except FileNotFoundError as err:
            raise KeyFileError(f"TorchServe key file {self.path} not found (is TorchServe running?)") from err
        stamp = (st.st_mtime_ns, st.st_size)
        if self._keys is None or stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
                self._keys = Keys(inference=data["inference"]["key"], management=data["management"]["key"],
                                  api=data["API"]["key"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise KeyFileError(f"TorchServe key file {self.path} is unreadable: {err}") from err
            self._stamp = stamp
        return self._keys

    def header(self, kind: str = "inference") -> dict[str, str]:
        keys = self.load()
        return {"Authorization": f"Bearer {getattr(keys, kind)}"}

    def renew(self, management_url: str, kind: str = "inference", timeout: float = 5.0) -> Keys:
        """Ask TorchServe for a new key of this kind (it rewrites the file), then re-read it."""
        keys = self.load()
        r = httpx.put(f"{management_url.rstrip('/')}/token", params={"type": kind},
                      headers={"Authorization": f"Bearer {keys.api}"}, timeout=timeout)
        r.raise_for_status()
        self._stamp = None
        return self.load()
