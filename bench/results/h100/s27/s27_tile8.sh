# Session 27, last call: int4's tile 8 (tile 6 with one lop3 a nibble pair: 227 SASS instructions a K-loop trip
# against 258) in the one-row sweep, then the engine with the sweep's picks against TUNED's, and bf16, one machine.
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/t8; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt
pack() { tar czf $OUT/t8.tgz -C /tmp t8; }
QWEN3VL_PDL=2 timeout 130 python3 -m bench.quant_check --sections sweep --rows 1 --formats int4 --int4-kernels 8,6 \
  --sweep-s ${SWEEP_S:-90} --out $R/quant.json > $R/quant.log 2>&1
echo "== sweep rc=$? $SECONDS"; grep -E "wrong|best|int4" $R/quant.log | tail -12; pack
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "int4 swept" "int4 tuned" "bf16 tuned"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-260} ] && break
  T=; [ $2 = swept ] && T=$R/quant.json
  timeout 60 env QWEN3VL_KERNEL_TUNING=$T $M --precision $1 --out $R/m_$1_$2.json > $R/m_$1_$2.log 2>&1
  echo "== $1 $2 rc=$? $SECONDS"; grep -E "^$1 engine" $R/m_$1_$2.log | cut -c1-80; pack
done
