# For session 30's first device call (bench/README's list, item 1): ~9 min warm on an H100 or H200.
#   BENCH_COMMIT=<commit> bash bench/results/s29/next_call1.sh
# 1. int4's CUDA kernel (kernels/w4_mma.py) swept at 1, 32, 8 and 16 rows, each config's output checked against
#    float64 (`wrong` lines), then the Triton kernels' TUNED picks timed the same way (each with its consumer).
# 2. The engine, 1 and 32 streams: int4 with the CUDA kernel up to 8 rows (QWEN3VL_INT4_MMA=1) and up to 32
#    (QWEN3VL_INT4_MMA_ROWS=32), with the sweep's picks, against int4 as served today and bf16; two rounds.
# 3. If time is left: step profiles with PDL off, int4 with and without it (a kernel's own time).
set +e
. bench/device_setup.sh n1
Q="python3 -m bench.quant_check --sections sweep"
QWEN3VL_PDL=2 timeout 150 $Q --rows 1,32,8,16 --formats int4mma --sweep-s 120 --out $R/mma.json > $R/mma.log 2>&1
echo "== mma sweep rc=$? $SECONDS"; grep -E "wrong|failed|Error|^sweep|TUNED|MmaConfig" $R/mma.log | cut -c1-220; pack
QWEN3VL_PDL=2 timeout 60 $Q --rows 1,32 --formats int4 --defaults-only --out $R/triton.json > $R/triton.log 2>&1
echo "== triton defaults rc=$? $SECONDS"; grep -E "wrong|failed|^sweep" $R/triton.log | cut -c1-200; pack
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
T="QWEN3VL_KERNEL_TUNING=$R/mma.json"
for c in "int4 mma 1" "int4 triton 1" "bf16 - 1" "int4 mma32 1" "int4 mma 2" "int4 triton 2"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-480} ] && break
  E=; [ $2 = mma ] && E="QWEN3VL_INT4_MMA=1 $T"; [ $2 = mma32 ] && E="QWEN3VL_INT4_MMA=1 QWEN3VL_INT4_MMA_ROWS=32 $T"
  timeout 70 env $E $M --precision $1 --out $R/m_$1_$2_$3.json > $R/m_$1_$2_$3.log 2>&1
  echo "== $1 $2 $3 rc=$? $SECONDS"; grep -E "^$1 engine|Error|error" $R/m_$1_$2_$3.log | cut -c1-120; pack
done
for c in "mma QWEN3VL_INT4_MMA=1" "triton QWEN3VL_INT4_MMA=0"; do set -- $c
  [ $SECONDS -gt ${PROFILE_BUDGET_S:-520} ] && break
  timeout 60 env QWEN3VL_PDL=0 $2 $T python3 -m bench.step_profile --model random-weights:4b --precision int4 \
    --compile off --out $R/sp_$1.json > $R/sp_$1.log 2>&1; echo "== profile $1 rc=$? $SECONDS"
  sed -n 3,14p $R/sp_$1.log | cut -c1-110; pack
done
