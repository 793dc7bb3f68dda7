#!/usr/bin/env bash
# One device-machine call: carried wheels, GPU tests, then the benchmarks named in $BENCH (default: all).
# Writes logs and JSON under $OUT. Usage on the device tool: bash bench/gpu_session.sh tests|matrix|restart|soak
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
for step in "$@"; do
    case "$step" in
    tests)
        timeout 420 python3 -m pytest -m gpu tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" ;;
    matrix)  # switches beside restarts of the same model into each target
        timeout "${LIMIT:-500}" python3 bench/switch_matrix.py --shape "${SHAPE:-llama2-7b}" --devices 0,1,2,3 \
            --topologies "${TOPOS:-TP1PP4,TP2PP2,TP4PP1,TP1PP2,TP2PP1}" \
            --out "$OUT/switch_matrix_${SHAPE:-llama2-7b}.json" 2>&1 | grep -v '^\[rank' | tail -40 ;;
    soak)  # 200 random switches under streaming load; ~1 s a switch on 4 H100s, plus start-up: about 6 minutes
        timeout "${LIMIT:-420}" python3 bench/soak.py --shape "${SHAPE:-llama2-7b}" --devices 0,1,2,3 \
            --switches "${SWITCHES:-200}" --requests 32 --concurrency 16 --short-tokens 16 --long-tokens 128 \
            --out "$OUT/soak_${SHAPE:-llama2-7b}.json" 2>&1 | grep -v '^\[rank' | tail -60 ;;
    restart)
        timeout 550 python3 bench/switch_matrix.py --shape "${SHAPE:-llama2-7b}" --devices 0,1,2,3 --restart-only \
            --out "$OUT/restart_${SHAPE:-llama2-7b}.json" 2>&1 | tail -20 ;;
    esac
done
