"""Check a KServe manifest against KServe's own types: the OpenAPI model classes of the `kserve`
package (kserve.models.V1beta1*) and, for the Kubernetes parts, kubernetes.client.models. Every key
must be a field of its class (unknown keys fail with their path), every value must have the field's
type, and each object is built through its generated constructor so that the classes' own checks
(required fields, strict types) run too.

Only the type modules are imported: `kserve/__init__.py` imports KServe's whole model server
(grpc, pandas, FastAPI; handler/kserve_predictor.py runs it, in its own process), and
`kubernetes/__init__.py` the whole API client, so both packages are registered bare."""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import re
import sys
import types

import pydantic

# The `kubernetes` client types resource maps as strings, where the API takes Kubernetes
# quantities ("2", "500m", "3Gi"): these fields are parsed with the client's quantity parser.
QUANTITY_FIELDS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests")}
# Scalars of the generators' type strings (kserve: python-legacy, kubernetes: pydantic);
# 'object' is free-form (e.g. an int-or-string port).
SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "object": (object,),
           "datetime": (str, datetime.datetime), "date": (str, datetime.date)}
LIST = re.compile(r"[lL]ist\[(.+)\]")
DICT = re.compile(r"dict\(str, (.+)\)|Dict\[str, (.+)\]")


class ManifestError(ValueError):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def _register_bare_package(name: str) -> None:
    """`name` as a package whose submodules import, without running its __init__.py."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)  # finds the package; does not execute it
    if spec is None:
        raise ModuleNotFoundError(f"{name} is not installed: run `make install` (requirements-kserve.txt)")
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package


def _type_modules():
    for name in ("kserve", "kubernetes", "kubernetes.client", "kubernetes.utils"):
        _register_bare_package(name)
    return (importlib.import_module("kserve.models"), importlib.import_module("kubernetes.client.models"),
            importlib.import_module("kubernetes.utils.quantity").parse_quantity)


kserve_models, kubernetes_models, parse_quantity = _type_modules()


def model_class(type_name: str):
    """The class of an OpenAPI type name: KServe's own first, then Kubernetes'."""
    for models in (kserve_models, kubernetes_models):
        try:
            return getattr(models, type_name)
        except AttributeError:
            pass
    return None


def build(manifest: dict, type_name: str = "V1beta1InferenceService"):
    """``manifest`` as an object of KServe's ``type_name``; ManifestError lists every problem."""
    built, errors = _walk(manifest, type_name, "")
    if errors:
        raise ManifestError(errors)
    return built


def errors_of(manifest: dict, type_name: str = "V1beta1InferenceService") -> list[str]:
    """Every problem in ``manifest`` as 'path: what' lines (empty: valid)."""
    return _walk(manifest, type_name, "")[1]


def _walk(value, type_name: str, path: str):
    where = path or "(top)"
    if value is None:  # null: the field is unset, as Kubernetes reads it
        return None, []
    if match := LIST.fullmatch(type_name):
        if not isinstance(value, list):
            return None, [f"{where}: expected a list, got {type(value).__name__} {value!r}"]
        results = [_walk(item, match.group(1), f"{path}[{i}]") for i, item in enumerate(value)]
        return [item for item, _ in results], [e for _, errors in results for e in errors]
    if match := DICT.fullmatch(type_name):
        if not isinstance(value, dict):
            return None, [f"{where}: expected a mapping, got {type(value).__name__} {value!r}"]
        item_type = match.group(1) or match.group(2)
        results = {key: _walk(item, item_type, f"{path}.{key}") for key, item in value.items()}
        return {key: item for key, (item, _) in results.items()}, [e for _, errors in results.values() for e in errors]
    if type_name == "quantity":
        try:
            parse_quantity(value)
        except (ValueError, TypeError) as error:
            return None, [f"{where}: not a Kubernetes quantity: {value!r} ({error})"]
        return str(value), []
    if type_name in SCALARS:
        expected = SCALARS[type_name]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected and object not in expected):
            return None, [f"{where}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return value, []
    cls = model_class(type_name)
    if cls is None:
        return None, [f"{where}: type {type_name} has no class in kserve or kubernetes, so it cannot be checked"]
    return _build_object(value, cls, path)


def _build_object(value, cls, path: str):
    where = path or "(top)"
    if not isinstance(value, dict):
        return None, [f"{where}: expected a {cls.__name__} mapping, got {type(value).__name__} {value!r}"]
    attribute_of = {key: attribute for attribute, key in cls.attribute_map.items()}
    kwargs, errors = {}, []
    for key, item in value.items():
        child = f"{path}.{key}" if path else key
        if key not in attribute_of:
            errors.append(f"{child}: unknown field of {cls.__name__}")
            continue
        attribute = attribute_of[key]
        type_name = cls.openapi_types[attribute]
        if (cls.__name__, attribute) in QUANTITY_FIELDS:
            type_name = "dict(str, quantity)"
        kwargs[attribute], item_errors = _walk(item, type_name, child)
        errors += item_errors
    if errors:
        return None, errors
    try:
        return cls(**kwargs), []
    except pydantic.ValidationError as error:  # kubernetes' classes
        return None, [f"{'.'.join([path, *map(str, e['loc'])]).lstrip('.')}: {e['msg']} ({cls.__name__})"
                      for e in error.errors()]
    except (ValueError, TypeError) as error:  # kserve's classes: required fields, allowed values
        return None, [f"{where}: {error} ({cls.__name__})"]
