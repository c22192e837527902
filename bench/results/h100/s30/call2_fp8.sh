# fp8's CUDA decode kernel (kernels/fp8_mma.py), for the device call after s29/next_call1.sh (bench/README's list):
# ~9 min warm on an H100 or H200.
#   BENCH_COMMIT=<commit> bash bench/results/s30/fp8_call.sh
# 0. The CUDA kernels' whole paths against float64 (`bench.quant_check --sections layout`: int4 and fp8 layers
#    converted in place, products at 1-64 rows through the kernels and at 100 through the Triton dequantize; for fp8
#    also nearly all-subnormal weights and 1e-4 activations, reported beside): fp8's four shapes are the gate.
# 1. The fp8 kernel swept at 1, 32, 8 and 16 rows, each config's output checked against float64 (`wrong` lines),
#    then fp8's Triton TUNED picks timed the same way (each with its consumer).
# 2. The engine, 1 and 32 streams: fp8 in the kernel's layout (QWEN3VL_FP8_MMA=1, the sweep's picks) with PDL late
#    everywhere and off, fp8 as served today (PDL off: its default) and bf16 (its default), one round each, then a
#    second round of the mma and today's fp8 if time is left.
set +e
. bench/device_setup.sh f1
timeout 120 python3 -m bench.quant_check --sections layout --out $R/layout.json > $R/layout.log 2>&1
echo "== layout rc=$? $SECONDS"; grep -E "^layout|Error" $R/layout.log | cut -c1-500; pack
# The gate (bench.quant_check.layout_ok): fp8's four shapes, the kernel's fp32 parts within 1e-3 of float64, every
# bf16 product within 1e-2 (else the mma runs below are skipped).
OK=$(python3 -c "import json; from bench.quant_check import layout_ok; print(int(layout_ok(json.load(open('$R/layout.json')), 'layout_fp8')))" 2>/dev/null || echo 0)
echo "== fp8 layout gate: $OK"
Q="python3 -m bench.quant_check --sections sweep"
QWEN3VL_PDL=2 timeout 150 $Q --rows 1,32,8,16 --formats fp8mma --sweep-s 110 --out $R/mma8.json > $R/mma8.log 2>&1
echo "== mma sweep rc=$? $SECONDS"; grep -E "wrong|failed|Error|^sweep|TUNED|MmaConfig" $R/mma8.log | cut -c1-220; pack
timeout 60 $Q --rows 1,32 --formats fp8 --defaults-only --out $R/triton8.json > $R/triton8.log 2>&1
echo "== triton defaults rc=$? $SECONDS"; grep -E "wrong|failed|^sweep" $R/triton8.log | cut -c1-200; pack
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "fp8 mma2 1" "fp8 triton 1" "bf16 - 1" "fp8 mma0 1" "fp8 mma2 2" "fp8 triton 2"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-500} ] && break
  [ ${2#mma} != $2 ] && [ "$OK" != 1 ] && continue
  E=; [ ${2#mma} != $2 ] && E="QWEN3VL_FP8_MMA=1 QWEN3VL_PDL=${2#mma} QWEN3VL_KERNEL_TUNING=$R/mma8.json"
  timeout 70 env $E $M --precision $1 --out $R/m_$1_$2_$3.json > $R/m_$1_$2_$3.log 2>&1
  echo "== $1 $2 $3 rc=$? $SECONDS"; grep -E "^$1 engine|Error|error" $R/m_$1_$2_$3.log | cut -c1-120
  grep -o '"fp8_mma_layers": [0-9]*' $R/m_$1_$2_$3.json | head -1; pack
done
