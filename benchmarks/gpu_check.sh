#!/usr/bin/env bash
# The forward pass on a GPU, served and in-process, in one prepared run for a GPU machine lent to a session
# (the device tool: a bare machine with torch on Python 3.12, ~15 minutes of device time per task, 64 MiB
# carried per call, nothing to download there).
#
#   here:   bash benchmarks/gpu_check.sh prepare    # into .gpu-check/ (git-ignored): the test split + meta (30 MB)
#                                                   # and the wheels of what that machine lacks (KServe, FastAPI,
#                                                   # torch-model-archiver ...; ~13 MB, cp312 manylinux)
#   there:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-check"], timeout_s=600)
#   try it on a CPU first:  GPU_CHECK_DEVICE=cpu GPU_CHECK_WIDTHS=3 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#                           (GPU_CHECK_LIMITS="90 30 60": shorter step limits, to see each one cut short)
#
# 1. benchmarks.bench_served_engines: each engine a GPU worker serves (eager-fp32, compile-fp32: compile-bf16 is
#    refused there, the archive's engines.json being the CPUs' figures; steps 2 and 3 measure it) served by KServe's own model server (the Open Inference Protocol path; TorchServe's Java and its 45 MB
#    model-server.jar do not fit the carry beside the data): images/s and p50 at concurrency 1 and 16, and the
#    answers on 1,000 test images against eager fp32 in-process;
# 2. training.engines: their top-1 and agreement with fp32 on the full test split (the record goes to the
#    output folder, not to the CPUs' engines.json);
# 3. benchmarks.bench_engines: in-process images/s at batch 6 and 1, the shipped width 3 and the seed's width 10.
# Output: $OUT (the device tool's) or ./gpu-check-out/. Each step has a time limit; one failing does not stop the next.
# The limits, 240 + 60 + 150 s (GPU_CHECK_LIMITS), with the wheels' install and the imports keep the call near 8 of
# its 10 minutes (300 + 90 + 180 s reached the cap), leaving device minutes to rerun a step. Step 1 gives
# a server half its limit to start, so a slow compile reads "did not start", and it and step 2 write their JSON after
# each engine: a step cut short keeps what it measured. Temporary files (the wheels' install, the benchmarks'
# folders) go to one folder, removed on exit.
set -uo pipefail
cd "$(dirname "$0")/.."
# Packages the device image lacks (its list: /work/.library/device/KINDS.md), at this checkout's versions.
DEVICE_LACKS="annotated-types cloudevents deprecation durationpy enum-compat fastapi grpc-interceptor httptools kserve
kubernetes oauthlib orjson pydantic pydantic-core python-multipart pytz requests-oauthlib starlette timing-asgi
torch-model-archiver typing-inspection uvicorn watchfiles websocket-client"

if [ "${1:-}" = prepare ]; then
    source_dir="${CIFAR100_DATA:-../shared/data}/cifar-100-python"
    venv_python="${PYTHON:-.venv/bin/python}"
    mkdir -p .gpu-check/data/cifar-100-python .gpu-check/wheels
    cp "$source_dir/test" "$source_dir/meta" .gpu-check/data/cifar-100-python/ || exit 1
    pins=()
    for name in $DEVICE_LACKS; do
        version=$("$venv_python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$version" ] || { echo "$name is not installed in $venv_python's environment (make install)"; exit 1; }
        pins+=("$name==$version")
    done
    "$venv_python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu-check/wheels "${pins[@]}" || exit 1
    du -sh .gpu-check/data .gpu-check/wheels
    exit 0
fi

out="${OUT:-gpu-check-out}"
python="${PYTHON:-python3}"
device="${GPU_CHECK_DEVICE:-cuda}"
read -r -a widths <<< "${GPU_CHECK_WIDTHS:-3 10}"
read -r served_s record_s in_process_s <<< "${GPU_CHECK_LIMITS:-240 60 150}"
engines=(eager-fp32 compile-fp32 compile-bf16)
served=(eager-fp32 compile-fp32)  # what a GPU worker serves on the archive's (the CPUs') record
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CIFAR100_DATA="$PWD/.gpu-check/data" PYTHONUNBUFFERED=1 TMPDIR="$work"

step() {  # a step's failure or timeout is logged and the next step still runs
    local limit=$1; shift
    echo "== $* (at most ${limit} s)"
    # SIGTERM first (the benchmarks then stop their servers), SIGKILL 10 s later if it is still there.
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 0 ] || echo "== exited $rc: $*"
}

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    if ! "$python" -c "import kserve, fastapi, model_archiver" 2>/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
            .gpu-check/wheels/*.whl && export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" \
            PATH="$work/site/bin:$PATH" || echo "== the wheels did not install: the served step will fail"
    fi
    "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    if [ "$device" = cpu ]; then export CUDA_VISIBLE_DEVICES=; fi  # the served step's predictor: the CPU as asked
    step "$served_s" "$python" -m benchmarks.bench_served_engines --engines "${served[@]}" --concurrency 1 16 \
        --duration 8 --images 1000 --start-timeout $((served_s / 2)) --out "$out/served-$device.json"
    step "$record_s" "$python" -m training.engines --device "$device" --engines "${engines[@]:1}" \
        --record "$out/engines-$device.json"
    step "$in_process_s" "$python" -m benchmarks.bench_engines --device "$device" --widths "${widths[@]}" \
        --engines "${engines[@]}" --seconds 1 --rounds 2
    date -u
} 2>&1 | tee "$out/gpu_check.log"
