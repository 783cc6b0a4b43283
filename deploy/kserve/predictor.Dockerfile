# The CIFAR-100 model under KServe's own Python model server (handler/kserve_predictor.py): no
# TorchServe, no Java. The model (weights, engines, calibration) is not in the image: KServe's
# storage initializer puts the bundle (`make kserve-bundle`) at /mnt/models (STORAGE_URI in
# deploy/kserve/inferenceservice-predictor.yaml). Build from the repository root:
#   docker build -f deploy/kserve/predictor.Dockerfile -t REGISTRY/cifar100-predictor:TAG .
# (with a GPU: --build-arg TORCH_INDEX below).
# Versions: requirements.txt's pins (-c), kserve's with --no-deps (requirements-kserve.txt). The -c file's own
# `-r adapter/requirements.txt` installs those (pip reads a -r inside a constraints file as requirements): fastapi,
# uvicorn, aiohttp, prometheus_client ..., which kserve imports (tests/test_kserve_manifests.py checks the whole set).
FROM python:3.11-slim
WORKDIR /app
# A C/C++ compiler for torch.compile's engines (inductor's C++ on a CPU, Triton's launcher on a GPU): without
# one they fail to build and the start falls back to the next engine (auto on a CPU serves OpenVINO first).
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ && rm -rf /var/lib/apt/lists/*
COPY requirements.txt requirements-kserve.txt ./
COPY adapter/requirements.txt adapter/requirements.txt
# torch's CPU build by default; for a GPU image (inferenceservice-predictor-gpu.yaml)
# --build-arg TORCH_INDEX=https://pypi.org/simple: PyPI's Linux torch wheels are the CUDA builds.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -c requirements.txt \
        torch torchvision numpy pillow PyYAML openvino openvino-telemetry psutil httpx captum \
    && pip install --no-cache-dir --no-deps -r requirements-kserve.txt
COPY model/ model/
COPY handler/ handler/
COPY serving/ serving/
# The adapter's HTTP/1.1 protocol guards KServe's REST port too (connection caps, head deadline: adapter/protocol.py).
COPY adapter/ adapter/
# max_request_size when the bundle has no config.properties of its own (handler/kserve_predictor.py).
COPY config.properties .
# Compiled engines are cached per container (the first start builds them; OpenVINO's take ~2 s).
ENV CIFAR100_ENGINE_CACHE=/tmp/cifar100-engines
USER 1000
# The Open Inference Protocol over REST on 8080 and over gRPC on 8081.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "handler.kserve_predictor"]
CMD ["--model_dir=/mnt/models", "--http_port=8080", "--grpc_port=8081"]
