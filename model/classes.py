"""The 100 CIFAR-100 class names in canonical (label index) order, and the seed's display rule.

The names live in ``index_to_name.json`` beside this file; training, the handler (packed into
the archive) and the adapter all read that one file.
"""
from __future__ import annotations

import json
from pathlib import Path

INDEX_TO_NAME_PATH = Path(__file__).with_name("index_to_name.json")


def load_class_names(path: str | Path = INDEX_TO_NAME_PATH) -> list[str]:
    mapping = json.loads(Path(path).read_text())
    return [mapping[str(i)] for i in range(len(mapping))]


def display_name(label: str) -> str:
    """The seed API's rule: underscores become spaces, first letter capital (aquarium_fish -> Aquarium fish)."""
    text = label.replace("_", " ")
    return text[:1].upper() + text[1:]


CLASS_NAMES = load_class_names()
