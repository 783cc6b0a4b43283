"""The seed's `POST /classify/` API in front of TorchServe, and the page at `/` (no torch here)."""
