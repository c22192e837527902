# Session 28, calls 2-4, as run (one line each on the device, chained on call 1's warm machine; /tmp/c1/quant.json is
# call 1's sweep, QWEN3VL_KERNEL_TUNING's "swept"). Commit e355937.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=e355937
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
run() {  # dir precision tuning handoff
  T=; [ $3 = swept ] && T=/tmp/c1/quant.json; n=m_$2_$3_h$4_lc0_$SECONDS
  timeout 60 env QWEN3VL_KERNEL_TUNING=$T QWEN3VL_NORM_HANDOFF=$4 QWEN3VL_LAST_COMBINES=0 $M --precision $2 \
    --out $1/$n.json > $1/$n.log 2>&1
}
# call 2 (c3), then its step profile
R=/tmp/c3; mkdir -p $R
for c in "int4 swept 1" "int4 swept 0" "bf16 tuned 1" "bf16 tuned 0" "int4 swept 1" "int4 tuned 1" "bf16 tuned 1"; do
  run $R $c; done
QWEN3VL_KERNEL_TUNING=/tmp/c1/quant.json QWEN3VL_LAST_COMBINES=0 timeout 60 python3 -m bench.step_profile \
  --model random-weights:4b --precision int4 --compile off --out $R/sp_int4.json > $R/sp_int4.log 2>&1
# call 3 (c4)
R=/tmp/c4; mkdir -p $R
QWEN3VL_LAST_COMBINES=0 timeout 60 python3 -m bench.step_profile --model random-weights:4b --precision bf16 \
  --compile off --out $R/sp_bf16.json > $R/sp_bf16.log 2>&1
QWEN3VL_KERNEL_TUNING=/tmp/c1/quant.json QWEN3VL_LAST_COMBINES=0 timeout 70 python3 -m bench.step_profile \
  --model random-weights:4b --precision int4 --streams 32 --compile off --out $R/sp_int4_32.json > $R/sp_int4_32.log 2>&1
# call 4 (c5)
R=/tmp/c5; mkdir -p $R
for c in "bf16 tuned 0" "int4 swept 0" "bf16 tuned 1" "int4 swept 1"; do run $R $c; done
