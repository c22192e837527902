# Session 30, call 3 (a fresh machine): the CUDA decode kernels on by default (int4 and fp8, session 30's sweep picks
# in TUNED, fp8 with PDL in their layout) and prefill's dequantize from their layouts rewritten row by row (call 1:
# a 512-token prefill took 53 ms against 19 ms in int4's own layout). ~5 min warm.
#   BENCH_COMMIT=<commit> bash bench/results/s30/final_call.sh
# The engine at 1 and 32 streams and an image prompt's TTFT (1280x720: `generate`, the engine idle and while others
# decode): bf16, int4 and fp8 as served now (no switch set), then int4 and fp8 with their kernels off (the Triton
# kernels in their own layouts, as served before), then a second round of the three defaults if time is left.
set +e
. bench/device_setup.sh f3
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine,image"
for c in "bf16 on 1" "int4 on 1" "fp8 on 1" "int4 off 1" "fp8 off 1" "int4 on 2" "bf16 on 2" "fp8 on 2"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-330} ] && break
  E=; [ $2 = off ] && E="QWEN3VL_INT4_MMA=0 QWEN3VL_FP8_MMA=0"
  timeout 90 env $E $M --precision $1 --out $R/m_$1_$2_$3.json > $R/m_$1_$2_$3.log 2>&1
  echo "== $1 $2 $3 rc=$? $SECONDS"; grep -E "^$1 engine|image|Error|error" $R/m_$1_$2_$3.log | cut -c1-160
  grep -o '"\(int4\|fp8\)_mma_layers": [0-9]*' $R/m_$1_$2_$3.json | tr '\n' ' '
  grep -o '"[a-z_]*image[a-z_]*ttft[a-z_]*": [0-9.]*' $R/m_$1_$2_$3.json | tr '\n' ' '; echo; pack
done
