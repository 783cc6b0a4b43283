"""Running TorchServe for this project: keys, readiness, start/stop scripts (no torch here)."""
