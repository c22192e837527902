set +e
[ -d /tmp/site/gradio ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/r5; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt
pack() { tar czf $OUT/r5.tgz -C /tmp r5; }
# PDL per precision: early (1) / late (2) / off (0); fp8 also late with its own kernels launched as before
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "int4 1" "int4 2" "int4 0" "fp8 2" "fp8 0" "fp8 2 fp8" "fp8 1" "bf16 1" "bf16 2" "bf16 0"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-300} ] && break
  n=m_$1_pdl$2${3:+_skip$3}
  timeout 60 env QWEN3VL_PDL=$2 QWEN3VL_PDL_SKIP=$3 $M --precision $1 --out $R/$n.json > $R/$n.log 2>&1
  echo "== $n rc=$? $SECONDS"; grep -E "^$1 engine" $R/$n.log | cut -c1-80; pack
done
