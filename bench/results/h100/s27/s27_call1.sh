# Session 27, call 1, first thing on a fresh machine: issue 14's cold start (bf16, then int4), keeping precompile's
# files so a later fresh machine of the same kind can launch with them (--artifacts-from).
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
C=${BENCH_COMMIT:-unknown}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uptime; date -u; } > $OUT/gpu.txt
for p in bf16 int4; do
  d=/tmp/cs_$p; mkdir -p $d
  python3 -m bench.coldstart --precision $p --deadline-s ${DEADLINE_S:-240} --keep-artifacts $d/artifacts \
    --out $d --commit $C > $d/run.log 2>&1
  echo "== $p rc=$? $SECONDS"; tail -n 25 $d/run.log
  tar czf $OUT/cs_$p.tgz -C /tmp cs_$p
done
