#!/usr/bin/env bash
# The forward pass on a GPU, in one prepared run for a GPU machine lent to a session (the device tool: a
# bare machine with torch and Python 3.12, ~15 minutes of device time per task, 64 MiB carried per call).
#
#   here:   bash benchmarks/gpu_check.sh prepare    # the test split + meta into .gpu-check/ (git-ignored, 31 MB)
#   there:  run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-check"], timeout_s=540)
#   try it on a CPU first:  GPU_CHECK_DEVICE=cpu GPU_CHECK_WIDTHS=3 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# In-process figures of the engines a GPU worker can run (eager-fp32, compile-fp32, compile-bf16), batch 6 and
# batch 1, the shipped width 3 and the seed's width 10 (benchmarks.bench_engines), then their top-1 and
# agreement with fp32 on the full test split (training.engines; the record goes to the output folder, not to
# the CPUs' engines.json). Output: $OUT (the device tool's) or ./gpu-check-out/. TorchServe does not travel:
# a Java runtime and its 45 MB model-server.jar do not fit one call's carry beside the data.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    source_dir="${CIFAR100_DATA:-../shared/data}/cifar-100-python"
    mkdir -p .gpu-check/data/cifar-100-python
    cp "$source_dir/test" "$source_dir/meta" .gpu-check/data/cifar-100-python/ || exit 1
    du -sh .gpu-check
    exit 0
fi

out="${OUT:-gpu-check-out}"
python="${PYTHON:-python3}"
device="${GPU_CHECK_DEVICE:-cuda}"
read -r -a widths <<< "${GPU_CHECK_WIDTHS:-3 10}"
engines=(eager-fp32 compile-fp32 compile-bf16)
mkdir -p "$out"
export CIFAR100_DATA="$PWD/.gpu-check/data" PYTHONUNBUFFERED=1

step() {  # a step's failure or timeout is logged and the next step still runs
    local limit=$1; shift
    echo "== $* (at most ${limit} s)"
    timeout "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 0 ] || echo "== exited $rc: $*"
}

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    step 300 "$python" -m benchmarks.bench_engines --device "$device" --widths "${widths[@]}" --engines "${engines[@]}" \
        --seconds 2 --rounds 2
    step 200 "$python" -m training.engines --device "$device" --engines "${engines[@]:1}" --record "$out/engines-$device.json"
    date -u
} 2>&1 | tee "$out/gpu_check.log"
