# For session 30's first device call (bench/README's list, item 1): ~9 min warm on an H100 or H200.
#   BENCH_COMMIT=<commit> bash bench/results/s29/next_call1.sh
# 0. kernels/w4_mma.py's whole path against float64 (`bench.quant_check --sections layout`: a layer converted in
#    place, its products at 1-64 rows through the CUDA kernel and at 100 through the Triton dequantize): a gate.
# 1. The CUDA kernel swept at 1, 32, 8 and 16 rows, each config's output checked against float64 (`wrong` lines),
#    then the Triton kernels' TUNED picks timed the same way (each with its consumer).
# 2. The engine, 1 and 32 streams: int4 in the kernel's layout (QWEN3VL_INT4_MMA=1, the sweep's picks) against int4
#    as served today and bf16, three rounds of int4 (the 32-stream spread), one of bf16.
# 3. If time is left: step profiles with PDL off, int4 both ways (a kernel's own time).
set +e
. bench/device_setup.sh n1
timeout 120 python3 -m bench.quant_check --sections layout --out $R/layout.json > $R/layout.log 2>&1
echo "== layout rc=$? $SECONDS"; grep -E "^layout|Error" $R/layout.log | cut -c1-400; pack
# The gate (bench.quant_check.layout_ok): four shapes, the kernel's fp32 parts within 1e-3 of float64, every bf16
# product within 1e-2 (else the mma runs below are skipped, and the report says why).
OK=$(python3 -c "import json; from bench.quant_check import layout_ok; print(int(layout_ok(json.load(open('$R/layout.json')), 'layout')))" 2>/dev/null || echo 0)
echo "== layout gate: $OK"
Q="python3 -m bench.quant_check --sections sweep"
QWEN3VL_PDL=2 timeout 150 $Q --rows 1,32,8,16 --formats int4mma --sweep-s 110 --out $R/mma.json > $R/mma.log 2>&1
echo "== mma sweep rc=$? $SECONDS"; grep -E "wrong|failed|Error|^sweep|TUNED|MmaConfig" $R/mma.log | cut -c1-220; pack
QWEN3VL_PDL=2 timeout 60 $Q --rows 1,32 --formats int4 --defaults-only --out $R/triton.json > $R/triton.log 2>&1
echo "== triton defaults rc=$? $SECONDS"; grep -E "wrong|failed|^sweep" $R/triton.log | cut -c1-200; pack
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "int4 mma 1" "int4 triton 1" "bf16 - 1" "int4 mma 2" "int4 triton 2" "int4 mma 3" "int4 triton 3"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-480} ] && break
  [ $2 = mma ] && [ "$OK" != 1 ] && continue
  E=; [ $2 = mma ] && E="QWEN3VL_INT4_MMA=1 QWEN3VL_KERNEL_TUNING=$R/mma.json"
  timeout 70 env $E $M --precision $1 --out $R/m_$1_$2_$3.json > $R/m_$1_$2_$3.log 2>&1
  echo "== $1 $2 $3 rc=$? $SECONDS"; grep -E "^$1 engine|Error|error" $R/m_$1_$2_$3.log | cut -c1-120
  grep -o '"int4_mma_layers": [0-9]*' $R/m_$1_$2_$3.json | head -1
  grep -o '"prefill_forwards": [0-9.]*' $R/m_$1_$2_$3.json | tr '\n' ' '; echo; pack
done
for c in "mma QWEN3VL_INT4_MMA=1" "triton QWEN3VL_INT4_MMA=0"; do set -- $c
  [ $SECONDS -gt ${PROFILE_BUDGET_S:-520} ] && break
  [ $1 = mma ] && [ "$OK" != 1 ] && continue
  timeout 60 env QWEN3VL_PDL=0 $2 QWEN3VL_KERNEL_TUNING=$R/mma.json python3 -m bench.step_profile \
    --model random-weights:4b --precision int4 --compile off --out $R/sp_$1.json > $R/sp_$1.log 2>&1
  echo "== profile $1 rc=$? $SECONDS"; sed -n 3,14p $R/sp_$1.log | cut -c1-110; pack
done
