#!/usr/bin/env bash
# The project's one prepared GPU run (see analyses/measuring/gpu_check.py for what it measures and writes).
#
# On the GPU machine, from the repository root, with the carried wheels in .whl/:
#   bash benchmarks/gpu_check.sh                 # writes $OUT/gpu_check.{json,csv,log} and $OUT/profile.txt
# Here, on a CPU (what CI runs through tests/test_gpu_check.py):
#   bash benchmarks/gpu_check.sh --cpu-smoke
# The GPU image lacks datasets (and its dill/multiprocess) and h5netcdf; fetch them once, here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 h5netcdf==1.8.2
# and name .whl in the device run's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import datasets, h5netcdf" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: datasets/h5netcdf are not installed and no wheels are in .whl/; fetch them (see the top of $0)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl
    export PYTHONPATH="/tmp/gpu-check-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" -m analyses.measuring.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
