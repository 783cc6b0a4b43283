"""deploy/kserve/*.yaml against KServe's own types (the `kserve` package's InferenceService classes,
Kubernetes' for containers and resources; tests/kserve_types.py), so that a typo fails here rather
than at `kubectl apply` time, and the settings the README promises are in them."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

import kserve_types
from kserve_types import ManifestError, build, errors_of
from manifest_probes import REST_PORT, LiveRoute, liveness_probe, run_exec_probe
from torchserve_memory import KSERVE_WRAPPER_MIB, WORKER_GROWTH_MIB, java_ceiling_mib, room_for_arrivals_mib

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = {"cpu": REPO / "deploy" / "kserve" / "inferenceservice.yaml",
             "gpu": REPO / "deploy" / "kserve" / "inferenceservice-gpu.yaml",
             "canary": REPO / "deploy" / "kserve" / "inferenceservice-canary.yaml"}
PREDICTOR_MANIFEST = REPO / "deploy" / "kserve" / "inferenceservice-predictor.yaml"
PREDICTOR_GRPC_MANIFEST = REPO / "deploy" / "kserve" / "inferenceservice-predictor-grpc.yaml"
PREDICTOR_GPU_MANIFEST = REPO / "deploy" / "kserve" / "inferenceservice-predictor-gpu.yaml"


def load(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def pinned_torchserve() -> str:
    return re.search(r"^torchserve==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)


def kserve_protocols() -> set[str]:
    # kserve/constants/constants.py imports only os and enum (the package's __init__ is not run).
    from kserve.constants.constants import PredictorProtocol

    return {protocol.value for protocol in PredictorProtocol}


def kserve_framework_spec(format_name: str) -> str | None:
    """KServe's own spec class for a model format named in a predictor (e.g. pytorch ->
    V1beta1TorchServeSpec: the format the TorchServe runtime serves), None for an unknown one."""
    return kserve_types.kserve_models.V1beta1PredictorSpec.openapi_types.get(format_name)


def kserve_rest_protocols() -> set[str]:
    """The protocol versions KServe's predictor configuration knows (V1beta1PredictorProtocols)."""
    # Not exported by kserve.models' __init__: its own module.
    from kserve.models.v1beta1_predictor_protocols import V1beta1PredictorProtocols

    return set(V1beta1PredictorProtocols.attribute_map.values())


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_manifest_is_a_valid_inferenceservice_for_the_torchserve_runtime(kind):
    manifest = load(kind)
    assert errors_of(manifest) == []
    isvc = build(manifest)
    assert type(isvc) is kserve_types.kserve_models.V1beta1InferenceService
    assert (isvc.api_version, isvc.kind) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc.spec.predictor.model
    # KServe's own types say which runtime a format selects and which protocols exist.
    assert kserve_framework_spec(model.model_format.name) == "V1beta1TorchServeSpec", model.model_format.name
    assert model.protocol_version == "v2"
    assert model.protocol_version in kserve_rest_protocols() & kserve_protocols()
    # The runtime image's tag: the TorchServe version the archive is built and tested with.
    assert model.runtime_version.split("-")[0] == pinned_torchserve()
    assert model.storage_uri.startswith(("pvc://", "s3://", "gs://"))
    resources = model.resources
    assert type(resources) is kserve_types.kubernetes_models.V1ResourceRequirements
    assert resources.requests["cpu"] == resources.limits["cpu"]
    assert resources.requests["memory"] == resources.limits["memory"]
    # KServe's wrapper answers on 8080; the model name is the archive's (model_snapshot).
    probe = model.readiness_probe.http_get
    assert (probe.path, probe.port) == ("/v2/models/cifar100/ready", 8080)
    if kind == "gpu":
        assert resources.limits["nvidia.com/gpu"] == "1"
    else:
        assert "nvidia.com/gpu" not in resources.limits


def test_canary_sends_a_share_to_the_new_bundle_and_keeps_the_rest_on_the_old():
    canary, stable = build(load("canary")), build(load("cpu"))
    assert canary.metadata.name == stable.metadata.name  # the same InferenceService, a new revision
    assert 0 < canary.spec.predictor.canary_traffic_percent < 100
    assert stable.spec.predictor.canary_traffic_percent is None
    assert canary.spec.predictor.model.storage_uri != stable.spec.predictor.model.storage_uri
    # Everything but the bundle's location and the traffic split is the stable manifest's.
    same = copy.deepcopy(load("canary"))
    del same["spec"]["predictor"]["canaryTrafficPercent"]
    model_of(same)["storageUri"] = model_of(load("cpu"))["storageUri"]
    assert same == load("cpu")


def bundle_settings() -> tuple[dict[str, str], dict]:
    """The KServe bundle's TorchServe properties and its model's snapshot (workers, batch size) in them."""
    from serving.kserve import bundle_properties
    from serving.settings import MODEL_NAME

    props = bundle_properties("test")
    return props, json.loads(props["model_snapshot"])["models"][MODEL_NAME]["test"]


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_the_requests_let_into_a_torchserve_pod_fit_its_direct_memory_beside_the_batches(kind):
    """KServe's wrapper forwards every request it is given to TorchServe, which holds each body in Java's direct
    memory while it arrives, beside each worker's batch being copied to it: 96 of the largest at once lost
    batches (500 after responseTimeout; tests/test_hostile.py). Knative's queue-proxy lets containerConcurrency
    requests into the pod at once; that many of the bundle's largest requests fit, and TorchServe's queue
    takes them all (none answered 503 that the autoscaler would not count)."""
    props, snapshot = bundle_settings()
    concurrency = build(load(kind)).spec.predictor.container_concurrency
    assert concurrency, f"{kind} lets any number of requests into a pod"
    room = room_for_arrivals_mib(props, snapshot["maxWorkers"], snapshot["batchSize"])
    assert concurrency * int(props["max_request_size"]) / 2**20 <= room, (concurrency, room)
    assert concurrency <= int(props["job_queue_size"]) + snapshot["maxWorkers"] * snapshot["batchSize"]


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_a_torchserve_pods_memory_limit_holds_java_at_its_ceiling_beside_its_workers(kind, torchserve_ready):
    """Past its limit the pod is killed, with every request in it. Java may fill its heap and direct memory (a
    flood of the largest bodies: tests/test_hostile.py), the workers are this machine's real ones plus their growth
    under load, and KServe's wrapper runs beside them.
    The 3Gi of sessions before 45 fails here (Java's ceiling had grown with its heap). A GPU worker holds more (its
    CUDA context): not measured on this CPU."""
    import psutil

    props, snapshot = bundle_settings()
    workers = snapshot["maxWorkers"]
    # The first worker whole (its libraries' pages too), each other one's own pages: the pages the pod's cgroup is
    # charged for. (PSS would share the libraries' pages with every process outside the pod that maps them too.)
    memory = [process.memory_full_info()
              for process in psutil.Process(torchserve_ready.java_pid()).children(recursive=True)]
    workers_mib = (max(m.rss for m in memory) + (workers - 1) * max(m.uss for m in memory)) / 2**20
    needed_mib = java_ceiling_mib(props) + workers_mib + workers * WORKER_GROWTH_MIB + KSERVE_WRAPPER_MIB
    limits = build(load(kind)).spec.predictor.model.resources.limits
    assert kserve_types.parse_quantity(limits["memory"]) / 2**20 >= needed_mib, (limits["memory"], needed_mib)


@pytest.mark.parametrize("path, port", [*((path, "8082") for path in MANIFESTS.values()),  # the bundle's metrics_address
                                        (PREDICTOR_MANIFEST, "8080"), (PREDICTOR_GRPC_MANIFEST, "8080"),
                                        (PREDICTOR_GPU_MANIFEST, "8080")],  # its REST port
                         ids=lambda v: getattr(v, "name", v))
def test_every_inferenceservice_is_scraped_where_its_server_has_its_metrics(path, port):
    """What KServe's pod webhook makes of the annotations (pkg/webhook/admission/pod/metrics_aggregate_injector.go):
    the pod's prometheus.io/port is queue-proxy's 9091 (its own metrics only) unless metric aggregation is on, then
    9088, where queue-proxy serves its own beside those it scrapes from prometheus.kserve.io/port and path. With
    scraping alone, as the manifests had it, Prometheus never saw TorchServe's or the model server's metrics."""
    annotations = build(yaml.safe_load(path.read_text())).metadata.annotations
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations.get("serving.kserve.io/enable-metric-aggregation") == "true", annotations
    assert (annotations["prometheus.kserve.io/port"], annotations["prometheus.kserve.io/path"]) == (port, "/metrics")


@pytest.mark.parametrize("mutate, words", [
    (lambda m: m["spec"]["predictor"].__setitem__("canaryTrafficPercent", "10"),
     "spec.predictor.canaryTrafficPercent: expected int, got str '10'"),
    (lambda m: m["spec"]["predictor"].__setitem__("canaryTraficPercent", 10),
     "spec.predictor.canaryTraficPercent: unknown field of V1beta1PredictorSpec"),
])
def test_a_typo_in_the_canary_fails_validation(mutate, words):
    manifest = copy.deepcopy(load("canary"))
    mutate(manifest)
    assert any(words in e for e in errors_of(manifest)), errors_of(manifest)


def model_of(manifest: dict) -> dict:
    return manifest["spec"]["predictor"]["model"]


@pytest.mark.parametrize("mutate, words", [
    (lambda m: model_of(m).__setitem__("modelFromat", {"name": "pytorch"}),
     "spec.predictor.model.modelFromat: unknown field of V1beta1ModelSpec"),
    (lambda m: model_of(m)["resources"].__setitem__("limit", {"cpu": "2"}),
     "spec.predictor.model.resources.limit: unknown field of V1ResourceRequirements"),
    (lambda m: model_of(m)["resources"]["limits"].__setitem__("cpu", "two"),
     "spec.predictor.model.resources.limits.cpu: not a Kubernetes quantity: 'two'"),
    (lambda m: m["spec"]["predictor"].__setitem__("minReplicas", "1"),
     "spec.predictor.minReplicas: expected int, got str '1'"),
    (lambda m: model_of(m)["readinessProbe"].__setitem__("httpGets", {}),
     "spec.predictor.model.readinessProbe.httpGets: unknown field of V1Probe"),
    # Kubernetes' own class says so (pydantic: the field is required).
    (lambda m: model_of(m)["env"][0].pop("name"), "spec.predictor.model.env[0].name: Field required (V1EnvVar)"),
    # An unquoted number as an env value: the API server rejects it too.
    (lambda m: model_of(m)["env"][0].__setitem__("value", 1), "spec.predictor.model.env[0].value: expected str, got int 1"),
])
def test_a_typo_in_the_manifest_fails_validation(mutate, words):
    manifest = copy.deepcopy(load("cpu"))
    mutate(manifest)
    errors = errors_of(manifest)
    assert any(words in e for e in errors), errors
    with pytest.raises(ManifestError):
        build(manifest)


def test_the_kserve_type_checks_can_fail():
    # The lookups above answer "no" for what KServe does not know.
    assert kserve_framework_spec("pytorch") == "V1beta1TorchServeSpec"
    assert kserve_framework_spec("sklearn") != "V1beta1TorchServeSpec"
    assert kserve_framework_spec("torchscript") is None
    assert "v3" not in kserve_rest_protocols() and "grpc-v2" not in kserve_rest_protocols()


def test_kserve_constructor_checks_run():
    # V1beta1CanarySpec's generated setter requires `predictor`: the constructor's own check reports it.
    errors = errors_of({"trafficPercent": 10}, "V1beta1CanarySpec")
    assert errors == ["(top): Invalid value for `predictor`, must not be `None` (V1beta1CanarySpec)"]


# ---- KServe without TorchServe: the custom predictor container -------------------------------
PREDICTOR_DOCKERFILE = REPO / "deploy" / "kserve" / "predictor.Dockerfile"


def dockerfile_instruction(name: str) -> list[str]:
    """The JSON form of a Dockerfile instruction (ENTRYPOINT, CMD) as a list."""
    import json

    line = next(line for line in PREDICTOR_DOCKERFILE.read_text().splitlines() if line.startswith(f"{name} "))
    return json.loads(line[len(name) + 1:])


def test_the_predictor_manifest_runs_the_dockerfiles_image_on_the_same_bundle():
    manifest = yaml.safe_load(PREDICTOR_MANIFEST.read_text())
    assert errors_of(manifest) == []
    isvc = build(manifest)
    [container] = isvc.spec.predictor.containers
    assert type(container) is kserve_types.kubernetes_models.V1Container
    assert isvc.spec.predictor.model is None  # no runtime: the container is the model server
    env = {e.name: e.value for e in container.env}
    # The same bundle as the TorchServe runtime's manifest: one `make kserve-bundle`, either server.
    assert env["STORAGE_URI"] == build(load("cpu")).spec.predictor.model.storage_uri
    assert int(env["OMP_NUM_THREADS"]) == int(float(container.resources.limits["cpu"]))  # the pod's CPUs, not the node's
    # The container's arguments are the image's defaults, and they read the mount and serve on the probed port.
    assert container.args == dockerfile_instruction("CMD")
    assert {"--model_dir=/mnt/models", "--http_port=8080", "--grpc_port=8081"} <= set(container.args)
    assert dockerfile_instruction("ENTRYPOINT")[-2:] == ["-m", "handler.kserve_predictor"]
    probe = container.readiness_probe.http_get
    assert (probe.path, probe.port) == ("/v2/models/cifar100/ready", 8080)
    assert [p.container_port for p in container.ports] == [8080]
    # As many as its server lets wait (--max_waiting_requests' default): more got 503s no autoscaler counted.
    assert isvc.spec.predictor.container_concurrency == waiting_bound()


def waiting_bound() -> int:
    """The predictor's default --max_waiting_requests: job_queue_size in the config.properties the bundle copies."""
    from serving.torchserve import BASE_CONFIG, read_properties

    return int(read_properties(BASE_CONFIG)["job_queue_size"])


def _image_pip_names() -> list[str]:
    """The packages the predictor image installs by name (its pip line under -c requirements.txt)."""
    return re.search(r"-c requirements.txt \\\n\s+(.+?) \\\n", PREDICTOR_DOCKERFILE.read_text()).group(1).split()


def test_the_predictor_image_copies_what_exists_and_installs_pinned_versions():
    copied = [line.split()[1:-1] for line in PREDICTOR_DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")]
    sources = [source for sources in copied for source in sources]
    assert {"handler/", "model/", "serving/", "adapter/", "requirements-kserve.txt"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
    text = PREDICTOR_DOCKERFILE.read_text()
    assert "-c requirements.txt" in text and "--no-deps -r requirements-kserve.txt" in text
    # Every package the image installs by name is pinned in requirements.txt or the adapter's, which it
    # includes (the -c constraint).
    install = _image_pip_names()
    lines = [line for path in (REPO / "requirements.txt", REPO / "adapter" / "requirements.txt")
             for line in path.read_text().splitlines()]
    pinned = {line.split("==")[0].lower() for line in lines if "==" in line}
    assert install and all(name.lower() in pinned for name in install), install


def _requirement_names(path: Path) -> list[str]:
    """The distributions a requirements file names, its nested -r files' included."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names += _requirement_names(path.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            names.append(re.split(r"[=<>!~\[; ]", line)[0])
    return names


# Imported in a try block when installed (this environment has them for other tools), not needed by the image.
IMPORTED_WHEN_PRESENT = {"pydot",  # torch.fx's graph drawer
                         "rich", "pygments"}  # httpx's command line (httpx[cli])


def test_the_predictor_image_installs_everything_the_predictor_imports():
    """No Docker here: the image's two pip lines, read as pip reads them (a -r inside the -c constraints file is a
    requirements file to pip: adapter/requirements.txt's fastapi, uvicorn, aiohttp, prometheus_client ... are
    installed; requirements-kserve.txt without its dependencies), against the distributions that importing
    handler.kserve_predictor loads in this environment. (Checked for real on 2026-12-04: an empty virtualenv and
    the two lines import it.)"""
    import importlib.metadata as metadata
    import subprocess
    import sys

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    named = _image_pip_names()
    # requirements.txt as constraints: only its nested -r lines install anything.
    nested = [line.split()[1] for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("-r ")]
    wanted = [*named, *(name for path in nested for name in _requirement_names(REPO / path))]
    installed, environment = set(), {**default_environment(), "extra": ""}
    while wanted:
        name = canonical(wanted.pop())
        if name in installed:
            continue
        installed.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                wanted.append(requirement.name)
    installed |= {canonical(name) for name in _requirement_names(REPO / "requirements-kserve.txt")}  # --no-deps

    loaded = subprocess.run([sys.executable, "-c", "import sys, handler.kserve_predictor; print(*sys.modules)"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    owners = metadata.packages_distributions()
    imported = {canonical(dist) for module in loaded for dist in owners.get(module.split(".")[0], ())}
    assert imported and not imported - installed - IMPORTED_WHEN_PRESENT, sorted(imported - installed)


def test_the_grpc_manifest_is_the_same_predictor_routed_on_its_h2c_port():
    """Knative routes one port per container: the gRPC manifest is the REST one's container (image,
    arguments, bundle, threads, resources, concurrency) with the gRPC port, named h2c, and its probe there."""
    manifest = yaml.safe_load(PREDICTOR_GRPC_MANIFEST.read_text())
    assert errors_of(manifest) == []
    grpc_isvc, rest_isvc = build(manifest), build(yaml.safe_load(PREDICTOR_MANIFEST.read_text()))
    [grpc], [rest] = grpc_isvc.spec.predictor.containers, rest_isvc.spec.predictor.containers
    assert grpc_isvc.metadata.name != rest_isvc.metadata.name  # both can run side by side
    for field in ("image", "args", "env", "resources"):
        assert getattr(grpc, field) == getattr(rest, field), field
    assert grpc_isvc.spec.predictor.container_concurrency == rest_isvc.spec.predictor.container_concurrency
    [port] = grpc.ports
    assert (port.name, port.container_port) == ("h2c", 8081)
    assert f"--grpc_port={port.container_port}" in grpc.args
    assert grpc.readiness_probe.tcp_socket.port == port.container_port and grpc.readiness_probe.http_get is None


def test_the_gpu_predictor_manifest_is_the_same_server_with_a_gpu_and_the_cuda_image():
    """The same model server, arguments, bundle and probe as the CPU predictor's manifest, one GPU asked and
    limited, CPU threads as its CPU limit, and an image of its own (the Dockerfile's TORCH_INDEX build-arg)."""
    manifest = yaml.safe_load(PREDICTOR_GPU_MANIFEST.read_text())
    assert errors_of(manifest) == []
    gpu_isvc, cpu_isvc = build(manifest), build(yaml.safe_load(PREDICTOR_MANIFEST.read_text()))
    [gpu], [cpu] = gpu_isvc.spec.predictor.containers, cpu_isvc.spec.predictor.containers
    assert gpu_isvc.spec.predictor.model is None
    assert gpu_isvc.spec.predictor.container_concurrency == waiting_bound()  # the same server's bound
    for field in ("args", "ports"):
        assert getattr(gpu, field) == getattr(cpu, field), field
    assert gpu.readiness_probe.http_get == cpu.readiness_probe.http_get
    env, cpu_env = {e.name: e.value for e in gpu.env}, {e.name: e.value for e in cpu.env}
    assert env["STORAGE_URI"] == cpu_env["STORAGE_URI"]
    assert int(env["OMP_NUM_THREADS"]) == int(float(gpu.resources.limits["cpu"]))
    assert gpu.resources.requests["nvidia.com/gpu"] == gpu.resources.limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu.resources.limits
    assert gpu.image != cpu.image  # torch's CUDA build: a different image
    text = PREDICTOR_DOCKERFILE.read_text()
    default = re.search(r"^ARG TORCH_INDEX=(\S+)$", text, re.M)
    assert default and default.group(1).endswith("/whl/cpu")  # the CPU image stays the default build
    assert '--extra-index-url "$TORCH_INDEX"' in text
    assert "--build-arg TORCH_INDEX=" in PREDICTOR_GPU_MANIFEST.read_text()


def rest_port(container) -> int:
    return int(next(arg for arg in container.args if arg.startswith("--http_port=")).split("=", 1)[1])


def readiness_window_s(probe) -> int:
    """How long the readiness probe lets a start take before it gives up: the start's worst case."""
    return probe.initial_delay_seconds + probe.period_seconds * probe.failure_threshold


@pytest.mark.parametrize("path", [PREDICTOR_MANIFEST, PREDICTOR_GPU_MANIFEST, PREDICTOR_GRPC_MANIFEST],
                         ids=lambda path: path.name)
def test_every_predictor_manifest_has_a_liveness_probe_that_asks_the_model_server(path):
    """Without one, a model server that stopped answering (a wedged event loop) kept its pod: not ready, never
    restarted. Each predictor manifest now asks KServe's v2 liveness route on the container's REST port (an
    exec probe for the gRPC one: Knative points HTTP and TCP probes at its routed port, gRPC's), only after the
    readiness probe's window for a start (a first start compiles engines), with a timeout under its period."""
    [container] = build(yaml.safe_load(path.read_text())).spec.predictor.containers
    probe = container.liveness_probe
    assert probe is not None, f"{path.name} has no livenessProbe"
    assert probe.initial_delay_seconds >= readiness_window_s(container.readiness_probe)
    assert probe.timeout_seconds < probe.period_seconds and probe.failure_threshold >= 2
    if path == PREDICTOR_GRPC_MANIFEST:
        assert probe.http_get is None and probe.tcp_socket is None
        command = probe._exec.command
        assert command[:2] == ["python", "-S"]  # the image's Python, its standard library only
        assert rest_port(container) == REST_PORT and f"'127.0.0.1', {REST_PORT}," in command[-1] and "'/v2/health/live'" in command[-1]
        timeout = float(re.search(r"timeout=([0-9.]+)", command[-1]).group(1))
        assert timeout < probe.timeout_seconds  # it answers (fails) before the kubelet gives up on it
    else:
        assert (probe.http_get.path, probe.http_get.port) == ("/v2/health/live", rest_port(container))


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_every_torchserve_runtime_manifest_has_a_liveness_probe_on_torchserve_and_the_wrapper(kind):
    """Without one, a pod whose TorchServe (Java) or KServe wrapper died was never restarted: the wrapper's
    model-ready flag is set once at load, and the image's entrypoint ends in `tail -f /dev/null`. Each runtime
    manifest asks, from inside the container (TorchServe listens on the pod's loopback), TorchServe's /ping on
    the bundle's inference port and the wrapper's v2 liveness route, after the readiness window for a start,
    both within the kubelet's timeout; the three manifests carry the same probe."""
    from serving.kserve import POD_ADDRESSES

    model = build(load(kind)).spec.predictor.model
    probe = model.liveness_probe
    assert probe is not None, f"{kind} has no livenessProbe"
    assert probe.http_get is None and probe.tcp_socket is None  # neither could reach TorchServe's loopback port
    assert probe.initial_delay_seconds >= readiness_window_s(model.readiness_probe)
    assert probe.timeout_seconds < probe.period_seconds and probe.failure_threshold >= 2
    command = probe._exec.command
    assert command[:3] == ["python", "-S", "-c"]  # the image's Python, its standard library only
    torchserve_port = int(POD_ADDRESSES["inference_address"].rsplit(":", 1)[1])
    script = command[-1]
    assert f'({torchserve_port}, "/ping")' in script and f'({REST_PORT}, "/v2/health/live")' in script
    asks = len(re.findall(r"\((\d+), \"/", script))
    timeout = float(re.search(r"timeout=([0-9.]+)", script).group(1))
    assert asks * timeout < probe.timeout_seconds  # it answers (fails) before the kubelet gives up on it
    assert liveness_probe(MANIFESTS[kind]) == liveness_probe(MANIFESTS["cpu"])


def test_the_grpc_manifests_exec_liveness_probe_passes_only_while_the_server_answers_live():
    """The exec probe's own command, run: exit 0 for a 200 from /v2/health/live; non-zero for another status,
    no server on the port, or a server that takes the connection but never answers (within its timeout)."""
    from serving.process import free_port

    command = liveness_probe(PREDICTOR_GRPC_MANIFEST)["exec"]["command"]
    live = LiveRoute()
    try:
        assert run_exec_probe(command, live.port)[0] == 0
        live.status = 503
        assert run_exec_probe(command, live.port)[0] != 0
        live.hang = True
        code, seconds = run_exec_probe(command, live.port)
        assert code != 0 and seconds < 5 + 1, seconds  # its own timeout (4 s), under the kubelet's (5 s)
    finally:
        live.close()
    assert run_exec_probe(command, free_port())[0] != 0
