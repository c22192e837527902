# Session 28, call 1 (one machine): int4 tile 8 against tile 6 in the one-row sweep; then the engine (bench.matrix, 1 and
# 32 streams, each run ~35 s) for int4 and bf16 against the default (handoff on, last-program combine on, prefetch off,
# PDL early at one row and late elsewhere), one switch changed a run: QWEN3VL_PREFETCH=1, QWEN3VL_NORM_HANDOFF=0,
# QWEN3VL_LAST_COMBINES=0, QWEN3VL_PDL=2; and int4 with the sweep's picks.
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/c1; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt
pack() { tar czf $OUT/c1.tgz -C /tmp c1; }
PYTHONPATH=$PYTHONPATH:$PWD timeout 40 python3 bench/results/s28/attn_check.py > $R/attn_check.json 2> $R/attn_check.log; echo "== attn rc=$?"
cat $R/attn_check.json
QWEN3VL_PDL=2 timeout 110 python3 -m bench.quant_check --sections sweep --rows 1 --formats int4 --int4-kernels 8,6 \
  --sweep-s ${SWEEP_S:-75} --out $R/quant.json > $R/quant.log 2>&1
echo "== sweep rc=$? $SECONDS"; grep -E "wrong|best|int4" $R/quant.log | tail -12; pack
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
# precision, tuning (tuned | swept), then the switches: prefetch, handoff, last-program combine, PDL (- : default)
for c in "int4 tuned 0 1 1 -" "int4 tuned 1 1 1 -" "bf16 tuned 0 1 1 -" "bf16 tuned 1 1 1 -" "int4 tuned 0 0 1 -" \
         "int4 tuned 0 1 0 -" "bf16 tuned 0 0 0 -" "int4 swept 0 1 1 -" "int4 tuned 0 1 1 2" "bf16 tuned 0 1 1 2"; do
  set -- $c
  [ $SECONDS -gt ${BUDGET_S:-520} ] && break
  T=; [ $2 = swept ] && T=$R/quant.json
  P=; [ $6 != - ] && P=$6
  n=m_$1_$2_pf$3_h$4_lc$5${P:+_pdl$P}
  timeout 60 env QWEN3VL_KERNEL_TUNING=$T QWEN3VL_PREFETCH=$3 QWEN3VL_NORM_HANDOFF=$4 QWEN3VL_LAST_COMBINES=$5 \
    QWEN3VL_PDL=$P $M --precision $1 --out $R/$n.json > $R/$n.log 2>&1
  echo "== $n rc=$? $SECONDS"; grep -E "^$1 engine" $R/$n.log | cut -c1-80; pack
done
