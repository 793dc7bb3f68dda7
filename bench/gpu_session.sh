#!/usr/bin/env bash
# One device-machine call: install the carried wheels, then run the steps named as arguments, in order.
# Writes logs and JSON under $OUT. Usage:
#   bash bench/gpu_session.sh tests|inplace|checkpoint|matrix|restart|decode|decode_profile|decode_async|decode_tp|staged|workload|gil_ab|soak ...
set -uo pipefail
# bench/decode_profile.py at topology $1 on devices $2, "sync" or "async" ($3) tokens: the full printout and JSON
# under $OUT; shown here, its last 40 lines, or with $4 = brief each batch's summary and its 6 largest kernels
profile() {
    local shape=${SHAPE:-llama2-7b} name="decode_profile_${SHAPE:-llama2-7b}_$1_$3" flag=""
    flag=--no-async-tokens; [ "$3" = async ] && flag=--async-tokens
    timeout "${LIMIT:-170}" python3 bench/decode_profile.py --shape "$shape" --devices "$2" --topology "$1" $flag \
        --batches "${BATCHES:-1,64}" --checkpoints /tmp/remp-checkpoints --out "$OUT/$name.json" 2>&1 \
        | grep -v '^\[rank' > "$OUT/$name.log"
    if [ "${4:-}" = brief ]; then awk '/^ +[0-9.]+ ms/ { if (++k > 6) next } !/^ +[0-9.]+ ms/ { k = 0 } 1' "$OUT/$name.log"
    else tail -40 "$OUT/$name.log"; fi
}
# every TP×PP on all of DEVICES, tp a power of two, largest tp first: TP4PP1,TP2PP2,TP1PP4 on 0,1,2,3;
# TP8PP1,TP4PP2,TP2PP4,TP1PP8 on 0,...,7 (the matrix, restart and staged steps' defaults are bench/cli.py's)
full_topos() {
    local n tp=1 list=""
    n=$(echo "${DEVICES:-0,1,2,3}" | tr , '\n' | wc -l)
    while [ "$tp" -le "$n" ]; do
        [ $((n % tp)) = 0 ] && list="TP${tp}PP$((n / tp))${list:+,$list}"
        tp=$((tp * 2))
    done
    echo "$list"
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# one file for the cards, the commit and the steps' times: the device tool brings back at most 8 files
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/session.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/session.txt"
for step in "$@"; do
    echo "== $step at ${SECONDS} s" | tee -a "$OUT/session.txt"
    case "$step" in
    tests)
        timeout "${TESTS_LIMIT:-420}" python3 -m pytest -m gpu tests/test_gpu.py tests/test_gpu_graphs.py tests/test_gpu_memory.py -q -x -p no:cacheprovider \
            ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu_tests.log" ;;
    inplace)  # layer-ordered switches on 2 or 4 GPUs: memory below old + new, as plan priced, tokens exact (~1-2 min)
        timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -q -x -p no:cacheprovider -k layer_ordered 2>&1 \
            | tee "$OUT/gpu_inplace.log" ;;
    checkpoint)  # write the checkpoint of SHAPE once, for later calls on the same warm machine (70B: 138 GB)
        CK=/tmp/remp-checkpoints/${SHAPE:-llama2-7b}
        [ -f "$CK/config.json" ] || timeout "${LIMIT:-580}" python3 -m rempd make-checkpoint --shape "${SHAPE:-llama2-7b}" \
            --out "$CK" 2>&1 | tail -3
        df -h /tmp | tail -1 ;;
    matrix)  # switches (and, unless NO_RESTART=1, restarts into RESTART_TOPOS) of one shape; IN_PLACE=always|never;
             # MAX_TOKENS per stream (default 512; fewer for 70B, whose streams are slower); TOPOS: on 4 devices
             # TP1PP4,TP2PP2,TP4PP1,TP1PP2,TP2PP1, on 8 TP1PP8,TP2PP4,TP4PP2,TP8PP1 unless set
        timeout "${LIMIT:-500}" python3 bench/switch_matrix.py --shape "${SHAPE:-llama2-7b}" --devices "${DEVICES:-0,1,2,3}" \
            ${TOPOS:+--topologies "$TOPOS"} --repeats "${REPEATS:-1}" \
            ${NO_RESTART:+--no-restart} ${RESTART_TOPOS:+--restart-topologies "$RESTART_TOPOS"} \
            ${IN_PLACE:+--in-place "$IN_PLACE"} ${MAX_TOKENS:+--max-tokens "$MAX_TOKENS"} \
            --out "$OUT/switch_matrix_${SHAPE:-llama2-7b}.json" 2>&1 | grep -v '^\[rank' | tail -40 ;;
    decode)  # step time vs its bandwidth floor at TP1 / TP4 / TP2PP2, beside transformers generate(); ASYNC=0: sync tokens
        timeout "${LIMIT:-420}" python3 bench/decode.py --shape "${SHAPE:-llama2-7b}" --devices "${DEVICES:-0,1,2,3}" \
            $( [ -f "/tmp/remp-checkpoints/${SHAPE:-llama2-7b}/config.json" ] && echo --checkpoint "/tmp/remp-checkpoints/${SHAPE:-llama2-7b}" ) \
            $( [ "${ASYNC:-1}" = 1 ] && echo --async-tokens || echo --no-async-tokens ) \
            --out "$OUT/decode_${SHAPE:-llama2-7b}$( [ "${ASYNC:-1}" = 1 ] || echo _sync ).json" 2>&1 | grep -v '^\[rank' | tail -40 ;;
    decode_profile)  # where a decode step's time goes, batch 1 and 64, at TOPOLOGY (TP1PP1) on DEVICES (0); ASYNC=0:
        # sync tokens (async is the default). ~1 min on one GPU with the checkpoint (~32 s measured), made first if missing (~20 s)
        profile "${TOPOLOGY:-TP1PP1}" "${DEVICES:-${DEVICE:-0}}" "$( [ "${ASYNC:-1}" = 1 ] && echo async || echo sync )" ;;
    decode_async)  # A/B of EngineConfig.async_tokens, one GPU, batch 1 and 64: decode_profile off then on, ~1.5 min
        for mode in sync async; do profile TP1PP1 "${DEVICE:-0}" $mode; done ;;
    decode_tp)  # decode_profile on 4 GPUs: TP4PP1 sync and async, TP2PP2 sync and async (~1 min each, ~4-5 min in all)
        for run in TP4PP1:sync TP4PP1:async TP2PP2:sync TP2PP2:async; do
            profile "${run%%:*}" "${DEVICES:-0,1,2,3}" "${run##*:}" brief
        done ;;
    staged)  # staged vs stop-the-world switches under load, llama2-7b shape: ~1-2 min checkpoint, ~3 min run;
             # TOPOS: TP1PP4,TP2PP2,TP4PP1 on 4 devices, on 8 TP1PP8,TP2PP4,TP4PP2,TP8PP1 unless set; DAEMON_ARGS:
             # more rempd flags (--gpu-memory-utilization 0.95: a pool so large that staging must give blocks back)
        timeout "${LIMIT:-330}" python3 bench/staged_matrix.py --shape "${SHAPE:-llama2-7b}" --devices "${DEVICES:-0,1,2,3}" \
            ${TOPOS:+--topologies "$TOPOS"} ${DAEMON_ARGS:+--daemon-args "$DAEMON_ARGS"} \
            --out "$OUT/staged_matrix_${SHAPE:-llama2-7b}.json" 2>&1 | grep -v '^\[rank' | tail -30 ;;
    soak)  # 200 random switches under streaming load, float32 so that greedy tokens are exact: about 5 minutes
        timeout "${LIMIT:-420}" python3 bench/soak.py --shape "${SHAPE:-llama2-7b}" --devices "${DEVICES:-0,1,2,3}" \
            --dtype "${DTYPE:-float32}" \
            --switches "${SWITCHES:-200}" --requests 32 --concurrency 16 --short-tokens 16 --long-tokens 128 \
            --out "$OUT/soak_${SHAPE:-llama2-7b}.json" 2>&1 | grep -v '^\[rank' | tail -60 ;;
    restart)
        timeout "${LIMIT:-550}" python3 bench/switch_matrix.py --shape "${SHAPE:-llama2-7b}" --devices "${DEVICES:-0,1,2,3}" \
            --restart-only ${RESTART_TOPOS:+--restart-topologies "$RESTART_TOPOS"} \
            --out "$OUT/restart_${SHAPE:-llama2-7b}.json" 2>&1 | tail -20 ;;
    workload)  # fixed TOPOS (default: full_topos) vs auto over one day-shaped schedule (issue #6); ~8 min on 4 GPUs;
               # REMP_SWITCH_INTERVAL_S=0.0005 runs the daemon and workers at a 0.5 ms GIL interval (rempd/gil.py)
        SHAPE=${SHAPE:-llama2-7b}; CK=/tmp/remp-checkpoints/$SHAPE; WL_TOPOS=${TOPOS:-$(full_topos)}
        FIRST=${WL_TOPOS%%,*}; FIRST_TP=${FIRST#TP}; FIRST_TP=${FIRST_TP%%PP*}
        [ -f "$CK/config.json" ] || python3 -m rempd make-checkpoint --shape "$SHAPE" --out "$CK"
        python3 -m rempd serve --model "$CK" --devices "${DEVICES:-0,1,2,3}" --tp "$FIRST_TP" --pp "${FIRST##*PP}" \
            --port 18100 --socket /tmp/wl.sock \
            --state-dir /tmp/wl-state --policy-window 8 --policy-dwell 12 --policy-interval 0.5 \
            --policy-topologies "$WL_TOPOS" > "$OUT/workload_rempd.log" 2>&1 &
        RPID=$!
        timeout "${LIMIT:-450}" python3 bench/workload.py run --url http://127.0.0.1:18100 --socket /tmp/wl.sock \
            --model "$SHAPE" --modes "$WL_TOPOS,auto" --profile --peak-rate profile \
            --slo-ttft profile --slo-itl profile --duration "${DURATION:-56}" --prompt-tokens 256 --output-tokens 64 \
            --keep-records --out "$OUT/workload_$SHAPE.json" --plot "$OUT/workload_$SHAPE.png" 2>&1 | tee "$OUT/workload.log" | tail -40
        kill -TERM $RPID; wait $RPID ;;
    gil_ab)  # the GIL interval A/B (rempd/gil.py): one daemon at Python's 5 ms, one at 0.5 ms, each serving RATE
             # requests/s (40) for 20 s at TP4PP1 then TP2PP2; per-request ITL and TTFT side by side (~3 min, 7B)
        SHAPE=${SHAPE:-llama2-7b}; CK=/tmp/remp-checkpoints/$SHAPE
        [ -f "$CK/config.json" ] || python3 -m rempd make-checkpoint --shape "$SHAPE" --out "$CK"
        for interval in "" 0.0005; do
            REMP_SWITCH_INTERVAL_S=$interval python3 -m rempd serve --model "$CK" --devices "${DEVICES:-0,1,2,3}" \
                --tp 4 --pp 1 --port 18101 --socket /tmp/gil.sock --state-dir /tmp/gil-state > /tmp/gil_rempd.log 2>&1 &
            RPID=$!
            timeout 240 python3 bench/workload.py run --url http://127.0.0.1:18101 --socket /tmp/gil.sock --model "$SHAPE" \
                --modes TP4PP1,TP2PP2 --schedule steady:1.0 --peak-rate "${RATE:-40}" --duration 20 --slo-ttft 1 \
                --slo-itl 0.02 --prompt-tokens 256 --output-tokens 64 --keep-records \
                --out "$OUT/gil_ab_${interval:-default}.json" 2>&1 | tail -3
            kill -TERM $RPID; wait $RPID
        done
        python3 bench/gil_table.py "$OUT"/gil_ab_default.json "$OUT"/gil_ab_0.0005.json ;;
    esac
done
echo "== end at ${SECONDS} s" | tee -a "$OUT/session.txt"
