#!/usr/bin/env bash
# ReMP in two minutes on CPU: a tiny generated model served by 4 CPU workers at TP2×PP2, a streamed
# completion through the official openai client, then a live switch to TP4×PP1 while a second
# completion streams. Everything lives in a temporary directory that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

section() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

section "setup (.venv)"
bash scripts/setup.sh
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1  # one thread per worker: 4 workers share few cores
[ -t 1 ] || export COLUMNS="${COLUMNS:-120}"  # rempctl's tables wrap at 80 columns when piped to a file

WORK=$(mktemp -d -t remp-demo.XXXXXX)
DAEMON_PID="" STREAM_PID=""
cleanup() {
    local rc=$?
    trap '' INT TERM  # a second Ctrl-C must not cut the clean-up short
    [ -n "$STREAM_PID" ] && kill "$STREAM_PID" 2>/dev/null
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        section "stopping rempd (SIGTERM)"
        kill -TERM "$DAEMON_PID"
        wait "$DAEMON_PID" && echo "rempd stopped cleanly" || echo "rempd exited with $?"
    fi
    if [ "$rc" -eq 130 ]; then
        echo "demo interrupted" >&2
    elif [ "$rc" -ne 0 ] && [ -f "$WORK/rempd.log" ]; then
        echo "demo failed (exit $rc); the end of rempd's log:" >&2
        tail -n 30 "$WORK/rempd.log" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # through the EXIT trap, so the daemon never outlives the demo

section "a tiny checkpoint (Llama architecture, seeded random weights: its text is gibberish)"
rempd make-checkpoint --shape tiny-llama --out "$WORK/tiny-llama"

section "starting rempd: 4 CPU workers at TP2×PP2"
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export REMP_SOCKET="$WORK/rempd.sock"  # rempctl reads it too
BASE_URL="http://127.0.0.1:$PORT/v1"
rempd serve --model "$WORK/tiny-llama" --cpu-workers 4 --tp 2 --pp 2 --port "$PORT" \
    --socket "$REMP_SOCKET" >"$WORK/rempd.log" 2>&1 &
DAEMON_PID=$!
echo "rempd pid $DAEMON_PID, API $BASE_URL, control socket $REMP_SOCKET"
$PY - "$PORT" "$DAEMON_PID" <<'EOF'
import os, sys, time
import httpx
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("rempd exited during start-up")
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
            print(f"healthy after {time.monotonic() - deadline + 180:.1f} s")
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
sys.exit("rempd was not healthy after 180 s")
EOF

# Greedy decoding, so the same prompt gives the same tokens whatever the topology, switch or not.
cat >"$WORK/stream.py" <<'EOF'
import sys, time
from openai import OpenAI
base_url, out, echo = sys.argv[1], sys.argv[2], sys.argv[3] == "echo"
client = OpenAI(base_url=base_url, api_key="none")
stream = client.completions.create(model="tiny-llama", prompt="Once upon a time, ReMP", max_tokens=400,
                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
pieces, finish, start = [], None, time.monotonic()
with open(out + ".partial", "w") as partial:  # lets the demo see that the stream has begun
    for event in stream:
        text = event.choices[0].text
        pieces.append(text)
        partial.write(text)
        partial.flush()
        finish = event.choices[0].finish_reason or finish
        if echo:  # random weights give stray bytes and control characters: show them as dots
            print("".join(c if c.isprintable() else "·" for c in text), end="", flush=True)
open(out, "w").write("".join(pieces))
print(f"\n[stream completed: {len(pieces)} chunks in {time.monotonic() - start:.1f} s, finish_reason={finish}]")
EOF

section "a streamed completion through the openai client"
$PY "$WORK/stream.py" "$BASE_URL" "$WORK/first.txt" echo

section "rempctl status"
rempctl status

section "rempctl plan --tp 4 --pp 1 (changes nothing)"
rempctl plan --tp 4 --pp 1

section "rempctl switch --tp 4 --pp 1 while a second completion streams"
$PY "$WORK/stream.py" "$BASE_URL" "$WORK/second.txt" quiet >"$WORK/second.log" 2>&1 &
STREAM_PID=$!
for _ in $(seq 600); do  # switch only once tokens are flowing, so the request is live across the switch
    [ -s "$WORK/second.txt.partial" ] && break
    kill -0 "$STREAM_PID" 2>/dev/null || break
    sleep 0.05
done
echo "second stream running ($(wc -c <"$WORK/second.txt.partial") bytes so far); switching now"
rempctl switch --tp 4 --pp 1
wait "$STREAM_PID"
STREAM_PID=""
cat "$WORK/second.log"
if cmp -s "$WORK/first.txt" "$WORK/second.txt"; then
    echo "the stream that lived through the switch is token-identical to the one without a switch"
else
    echo "the two streams differ (they should not: greedy decoding)" >&2
    exit 1
fi

section "rempctl status"
rempctl status

section "rempctl switches"
rempctl switches
