# For session 29's first device call (bench/README's list, items 1 and 2): ~9 min warm on an H100.
#   BENCH_COMMIT=<commit> bash bench/results/h100/s28/next_call1.sh
# 1. The one-row int4 sweep as the engine launches (each product with its consumer), tile 8 at 8/16 rows a program.
# 2. The engine with the sweep's picks against TUNED, and bf16, at 1 and 32 streams; the 32-stream runs now admitted
#    together (`prefill_forwards` 2 a burst): three runs of int4 TUNED to see the spread left.
# 3. Step profiles with PDL off (a kernel's own time), int4 and bf16 at one stream.
set +e
. bench/device_setup.sh n1
QWEN3VL_PDL=2 timeout 130 python3 -m bench.quant_check --sections sweep --rows 1 --formats int4 --int4-kernels 8,6 \
  --sweep-s ${SWEEP_S:-100} --out $R/quant.json > $R/quant.log 2>&1
echo "== sweep rc=$? $SECONDS"; grep -E "wrong|failed|^sweep|int4 TUNED" -A0 $R/quant.log | cut -c1-160; pack
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "int4 swept 1" "int4 tuned 1" "bf16 tuned 1" "int4 tuned 2" "bf16 tuned 2" "int4 tuned 3"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-420} ] && break
  T=; [ $2 = swept ] && T=$R/quant.json
  timeout 60 env QWEN3VL_KERNEL_TUNING=$T $M --precision $1 --out $R/m_$1_$2_$3.json > $R/m_$1_$2_$3.log 2>&1
  echo "== $1 $2 $3 rc=$? $SECONDS"; grep -E "^$1 engine" $R/m_$1_$2_$3.log | cut -c1-80
  grep -o '"prefill_forwards": [0-9.]*' $R/m_$1_$2_$3.json | tr '\n' ' '; echo; pack
done
for p in int4 bf16; do
  [ $SECONDS -gt ${PROFILE_BUDGET_S:-520} ] && break
  QWEN3VL_PDL=0 timeout 60 python3 -m bench.step_profile --model random-weights:4b --precision $p --compile off \
    --out $R/sp_${p}_pdl0.json > $R/sp_${p}_pdl0.log 2>&1; echo "== profile $p rc=$? $SECONDS"
  sed -n 3,14p $R/sp_${p}_pdl0.log | cut -c1-110; pack
done
