"""deploy/kserve/*.yaml against KServe's own InferenceService schema and TorchServe runtime
(tests/data/kserve/: copied from kserve/kserve, see its README), so that a typo fails here rather
than at `kubectl apply` time, and the settings the README promises are in them."""
from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import pytest
import yaml

from crd_schema import schema_errors

REPO = Path(__file__).resolve().parents[1]
KSERVE_DATA = Path(__file__).resolve().parent / "data" / "kserve"
MANIFESTS = {"cpu": REPO / "deploy" / "kserve" / "inferenceservice.yaml",
             "gpu": REPO / "deploy" / "kserve" / "inferenceservice-gpu.yaml"}


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(gzip.decompress((KSERVE_DATA / "inferenceservice-v1beta1.schema.json.gz").read_bytes()))


@pytest.fixture(scope="module")
def runtime() -> dict:
    return yaml.safe_load((KSERVE_DATA / "kserve-torchserve.yaml").read_text())


def load(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def pinned_torchserve() -> str:
    return re.search(r"^torchserve==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_manifest_is_a_valid_inferenceservice_for_the_torchserve_runtime(kind, schema, runtime):
    isvc = load(kind)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert schema_errors(isvc, schema) == []
    model = isvc["spec"]["predictor"]["model"]
    formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["modelFormat"]["name"] == "pytorch" and "pytorch" in formats
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    # The runtime image's tag: the TorchServe version the archive is built and tested with.
    assert model["runtimeVersion"].split("-")[0] == pinned_torchserve()
    assert model["storageUri"].startswith(("pvc://", "s3://", "gs://"))
    resources = model["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    # KServe's wrapper answers on 8080; the model name is the archive's (model_snapshot).
    assert model["readinessProbe"]["httpGet"] == {"path": "/v2/models/cifar100/ready", "port": 8080}
    if kind == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert "nvidia.com/gpu" not in resources["limits"]


@pytest.mark.parametrize("mutate, words", [
    (lambda m: m["spec"]["predictor"]["model"].__setitem__("modelFromat", {"name": "pytorch"}), "modelFromat: unknown field"),
    (lambda m: m["spec"]["predictor"]["model"]["resources"].__setitem__("limit", {"cpu": "2"}), "limit: unknown field"),
    (lambda m: m["spec"]["predictor"]["model"]["resources"]["limits"].__setitem__("cpu", "two"), "does not match"),
    (lambda m: m["spec"]["predictor"].__setitem__("minReplicas", "1"), "expected integer"),
    (lambda m: m["spec"]["predictor"]["model"]["readinessProbe"].__setitem__("httpGets", {}), "httpGets: unknown field"),
    (lambda m: m["spec"]["predictor"]["model"]["env"][0].pop("name"), "required field 'name'"),
])
def test_a_typo_in_the_manifest_fails_validation(schema, mutate, words):
    isvc = copy.deepcopy(load("cpu"))
    mutate(isvc)
    errors = schema_errors(isvc, schema)
    assert any(words in e for e in errors), errors
