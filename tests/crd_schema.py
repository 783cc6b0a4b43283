"""Check a Kubernetes object against a CRD's structural schema (openAPIV3Schema) the way the API
server does with strict field validation (``kubectl apply --validate=strict``): unknown fields,
wrong types, missing required fields, enum and pattern violations are errors."""
from __future__ import annotations

import re

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}


def _type_ok(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number" and isinstance(value, bool):
        return False
    return isinstance(value, TYPES[kind])


def schema_errors(value, schema: dict, path: str = "") -> list[str]:
    """Every violation of ``schema`` in ``value``, as 'path: what' lines (empty: valid)."""
    where = path or "<root>"
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _type_ok(value, "integer")):
            return [f"{where}: expected an integer or a string, got {type(value).__name__}"]
    elif "anyOf" in schema:
        if all(schema_errors(value, option, path) for option in schema["anyOf"]):
            return [f"{where}: matches none of {schema['anyOf']}"]
    if "type" in schema and not _type_ok(value, schema["type"]):
        return [f"{where}: expected {schema['type']}, got {type(value).__name__} {value!r}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        properties = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: required field {name!r} missing")
        for name, item in value.items():
            child = f"{path}.{name}" if path else name
            if properties is not None and name in properties:
                errors += schema_errors(item, properties[name], child)
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(item, schema["additionalProperties"], child)
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{child}: unknown field (known: {', '.join(sorted(properties))})")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors
