# Session 28, call 1: session 27's tile-8 script (sweep tile 8 vs 6 at one row; matrix int4 swept / TUNED, bf16, all
# with the default PDL: early at one row, late elsewhere), then int4 TUNED and bf16 with QWEN3VL_PDL=2 (late
# everywhere) on the same machine: item 2 of bench/README's list.
set +e
BUDGET_S=330 bash bench/results/h100/s27/s27_tile8.sh
R=/tmp/t8
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
for p in int4 bf16; do
  [ $SECONDS -gt 520 ] && break
  timeout 60 env QWEN3VL_PDL=2 $M --precision $p --out $R/m_${p}_late.json > $R/m_${p}_late.log 2>&1
  echo "== $p late rc=$? $SECONDS"; grep -E "^$p engine" $R/m_${p}_late.log | cut -c1-80
  tar czf $OUT/t8.tgz -C /tmp t8
done
