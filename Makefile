# The user's verbs. `make serve` and `make test` work on a fresh machine (they install first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Where CIFAR-100 lives (the folder holding cifar-100-python/): env CIFAR100_DATA, else the
# shared copy beside the checkout, else ./data (where `make data` puts it). Set but empty counts as unset
# (`?=` kept it: --data-dir ""); override: `make train CIFAR100_DATA=` too.
ifeq ($(strip $(CIFAR100_DATA)),)
override CIFAR100_DATA := $(abspath $(firstword $(patsubst %/cifar-100-python,%,$(wildcard ../shared/data/cifar-100-python)) data))
endif
export CIFAR100_DATA
# The shipped default weights; `make archive WEIGHTS=path/to/other.pth` packages others.
# TS_MODEL_CONFIG=other.yaml (environment or make's command line): the model config the archive packs
# instead of handler/model-config.yaml (flip TTA on, other batching); the adapter reads it too.
WEIGHTS ?= model/weights/CIFAR100_model.pth
TRAIN_ARGS ?=

.PHONY: help install install-system data train evaluate archive kserve-bundle serve serve-kserve serve-torchserve \
        serve-adapter rollout stop stop-torchserve stop-adapter stop-kserve test test-unit test-bench bench bench-train bench-serve soak clean

# This list: each target with the first line of its comment in the Makefile.
# That line is shown alone: a whole sentence, meaningful outside this file (tests/test_cli.py checks).
help:
	@awk '/^# / && !c {c = substr($$0, 3)} /^[a-z-]+:/ {split($$0, t, ":"); printf "  make %-16s %s\n", t[1], c} !/^# / {c = ""}' $(firstword $(MAKEFILE_LIST))

# The project's environment: .venv (pip, the pinned requirements); `make test` adds node_modules (npm ci).
install: $(VENV)/.installed
# npm packages of the page tests (axe-core), exactly as package-lock.json pins them.
node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing (the page tests' axe-core): sudo make install-system"; exit 1; }
	npm ci --no-audit --no-fund
	touch $@
# --no-deps for kserve: it declares psutil<6 (pinned 7 here); requirements-kserve.txt pins what it imports.
$(VENV)/.installed: requirements.txt adapter/requirements.txt requirements-kserve.txt
	@python3 -c 'import ensurepip' 2>/dev/null || { echo "python3 cannot make a virtualenv (Debian: python3-venv): sudo make install-system"; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-kserve.txt
	touch $@

# Debian packages the tests and benchmarks need (as root; CI runs this).
# Java for TorchServe, Chromium for the page tests, wrk as the serving benchmarks' load generator, npm,
# python3-venv (Debian's python3 makes no virtualenv without it).
install-system:
	@# A Java older than 17 (TorchServe's minimum) counts as none: 17 is installed beside it.
	v=$$(java -version 2>&1 | sed -n 's/.*version "\(1\.\)\{0,1\}\([0-9]*\).*/\2/p' | head -1); \
	  [ "$${v:-0}" -ge 17 ] || (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless \
	  && update-alternatives --set java "$$(update-alternatives --list java | grep -m1 java-17)")
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	test -x /usr/bin/wrk || (apt-get update -qq && apt-get install -y -qq wrk)
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)
	@# g++: NNCF builds a C++ extension once for python -m training.quantize (and its test).
	command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++)
	python3 -c 'import ensurepip' 2>/dev/null || (apt-get update -qq && apt-get install -y -qq python3-venv)

# CIFAR-100 into $CIFAR100_DATA (./data unless set or ../shared/data has it) with torchvision (official files, md5 checked); ~170 MB.
data: install
	$(PY) -m training.data --data-dir $(CIFAR100_DATA)

# A training run into runs/latest (TRAIN_ARGS="--epochs 30 ..."; every option: python -m training.train --help).
# A run already there is continued with TRAIN_ARGS=--resume or started over with TRAIN_ARGS="--overwrite ...".
# No --out here: runs/latest is training.train's own default, so TRAIN_ARGS="--resume runs/w2/checkpoint.pt"
# continues that run in runs/w2 (an --out in TRAIN_ARGS still wins).
train: install
	$(PY) -m training.train --data-dir $(CIFAR100_DATA) $(TRAIN_ARGS)

# Top-1 of WEIGHTS on the full test split (EVAL_ARGS="--json ...").
evaluate: install
	$(PY) -m training.evaluate $(WEIGHTS) --data-dir $(CIFAR100_DATA) $(EVAL_ARGS)

# One command for the whole service: TorchServe (on the shipped weights) + adapter + page.
serve: install
	$(MAKE) --no-print-directory serve-torchserve  # (which builds the archive first)
	$(MAKE) --no-print-directory serve-adapter
	@echo "Open the page: http://127.0.0.1:$${ADAPTER_PORT:-8000}/   (stop everything with: make stop)"

# The same page without TorchServe or Java: the KServe bundle under KServe's own model server, the adapter in front.
# (The server's other options: PREDICTOR_ARGS="--log_max_bytes 1048576".)
serve-kserve: install
	$(MAKE) --no-print-directory kserve-bundle
	$(PY) -m serving.kserve predictor start
	@# An adapter already running in front of TorchServe (make serve's) is restarted in front of this one.
	@# This predictor stops a request whose client left: a request the adapter gave up on holds nothing there.
	OIP_URL=http://127.0.0.1:$${PREDICTOR_HTTP_PORT:-8085} MODEL_SERVER_HOLD_S=$${MODEL_SERVER_HOLD_S:-0} \
	  $(MAKE) --no-print-directory serve-adapter
	@echo "Open the page: http://127.0.0.1:$${ADAPTER_PORT:-8000}/   (stop everything with: make stop)"

# Stops the adapter, TorchServe and KServe's model server that make serve / make serve-kserve started (all three tried; non-zero when one failed).
stop:
	@status=0; \
	$(MAKE) --no-print-directory stop-adapter || status=1; \
	$(MAKE) --no-print-directory stop-torchserve || status=1; \
	$(MAKE) --no-print-directory stop-kserve || status=1; \
	exit $$status

# Stops KServe's model server alone.
stop-kserve:
	$(PY) -m serving.kserve predictor stop

# The /classify/ adapter + page in the background (logs/adapter.pid, logs/adapter.log); idempotent.
serve-adapter: install
	$(PY) -m adapter.run start

# Stops the adapter alone.
stop-adapter:
	$(PY) -m adapter.run stop

# model_store/cifar100.mar from $(WEIGHTS) + handler + class names (rebuilt only when an input changed).
archive: install
	$(PY) -m serving.archive --weights $(WEIGHTS)

# KServe's storage layout for WEIGHTS in dist/kserve/ (deploy/kserve/, README).
# config/config.properties + model-store/cifar100.mar; copy it where an InferenceService's storageUri points.
kserve-bundle: install
	$(PY) -m serving.kserve --weights $(WEIGHTS)

# TorchServe alone, in the background; waits for a READY worker (idempotent, as is its stop).
# config.properties; key_file.json here, logs in logs/.
serve-torchserve: install archive
	$(PY) -m serving.torchserve start

# Stops TorchServe alone.
stop-torchserve:
	$(PY) -m serving.torchserve stop

# WEIGHTS into the running TorchServe without a failed request (ROLLOUT_ARGS="--drain-s 2 ...").
# serving/rollout.py registers WEIGHTS as a new version, waits until it is READY and warm, makes it
# the default, drains and unregisters the old one. Rolling back: the same with the previous weights. (Not `make deploy`:
# deploy/ is a folder.) ROLLOUT_ARGS="--ready-timeout 600 --drain-s 2 --http-timeout 30" (default ready timeout:
# model-config.yaml's startupTimeout).
rollout: install
	$(PY) -m serving.rollout --weights $(WEIGHTS) $(ROLLOUT_ARGS)

# The serving benchmarks (BENCH_SERVE_ARGS="--duration 4"), figures printed.
# TorchServe vs the same model in-process, concurrency 1/4/16; then the adapter, then v2 bodies vs raw
# ones through the KServe bundle (concurrency 16 unless --concurrency),
# then 12 MP phone photos through /classify/ (shrunk in the adapter, by the page, or not at all).
bench-serve: install
	$(PY) -m benchmarks.bench_serve --weights $(WEIGHTS) $(BENCH_SERVE_ARGS)
	$(PY) -m benchmarks.bench_adapter --weights $(WEIGHTS) $(BENCH_SERVE_ARGS)
	$(PY) -m benchmarks.bench_kserve --weights $(WEIGHTS) $(BENCH_SERVE_ARGS)
	$(PY) -m benchmarks.bench_photos --weights $(WEIGHTS) $(BENCH_SERVE_ARGS)
	$(PY) -m benchmarks.bench_engines

# Hostile and heavy clients, the long runs (~20 min; SOAK_ARGS="--requests 2000").
# First what explanations, 12 MP photos and floods of GET /classes, /metrics, /health (each from one address not the user's)
# cost one user's /classify/
# (FAIRNESS_ARGS="--duration 5"); then 64 concurrent 9.9 MB uploads with each process's peak memory,
# a 20,000-request soak, 150 s of slow and stalled uploads; last, KServe's model server's peak memory under
# 64 concurrent 11 MiB bodies over REST and over gRPC, with and without its bound on the bodies it holds.
soak: install
	$(PY) -m benchmarks.bench_fairness --weights $(WEIGHTS) $(FAIRNESS_ARGS)
	$(PY) -m benchmarks.soak $(SOAK_ARGS)
	$(PY) -m benchmarks.bench_predictor_memory --weights $(WEIGHTS)

# Every test but the benchmarks' own runs: unit + integration (real TorchServe, headless Chromium, CIFAR-100).
# The `bench` tier (make test-bench) is left out: what CI runs must end within its 30 minutes (tests/conftest.py).
test: install node_modules/.installed
	$(PY) tests/lanes.py -m "not bench" $(PYTEST_ARGS)

# The fast tier: no TorchServe, no browser, no data set (~5 min on 2 cores; runs without Java or Chromium).
test-unit: install
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# The benchmarks' end-to-end tests: each benchmark that starts servers of its own, on short points (~2.5 min).
test-bench: install
	$(PY) -m pytest -m bench $(PYTEST_ARGS)

# Both benchmarks: make bench-train, then make bench-serve.
bench: bench-train bench-serve

# Training images/s per precision and layout (BENCH_TRAIN_ARGS="--widths 3 --only fast").
bench-train: install
	$(PY) -m training.bench --data-dir $(CIFAR100_DATA) $(BENCH_TRAIN_ARGS)

# Removes what the targets made: runs, model_store, logs, test-artifacts, dist, node_modules.
# make stop first: the running services' pid files are in logs/ (without them, nothing could stop them).
clean:
	-test ! -x $(PY) || $(MAKE) --no-print-directory stop
	rm -rf runs model_store logs test-artifacts dist node_modules
