# Session 27: issue 14's own protocol on a fresh machine. The first launch of each precision has only the files
# precompile wrote on an earlier machine of the same kind (call 1's H100, carried gzipped), no cold launch before it.
set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
C=${BENCH_COMMIT:-unknown}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; uptime; date -u; } > $OUT/gpu.txt
# The files: `git checkout c5fcf8c -- bench/results/h100/s27/carried` (removed from the tree after the call).
S=bench/results/h100/s27/carried
for p in bf16 int4; do
  d=/tmp/af_$p; mkdir -p $d/carried
  for f in $S/$p/*.gz; do gunzip -c $f > $d/carried/$(basename $f .gz); done
  python3 -m bench.coldstart --precision $p --deadline-s 150 --artifacts-from $d/carried --out $d --commit $C \
    > $d/run.log 2>&1
  echo "== $p rc=$? $SECONDS"; grep -E "bytecode|artifacts:|done in" $d/run.log | cut -c1-300
  rm -r $d/carried; tar czf $OUT/af_$p.tgz -C /tmp af_$p
done
