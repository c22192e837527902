set +e
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
[ -d /tmp/site/gradio ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
R=/tmp/r2; mkdir -p $R
pack() { tar czf $OUT/r2.tgz -C /tmp r2; }
step() { local name=$1 t=$2; shift 2; local s=$(date +%s); timeout $t "$@" > $R/$name.log 2>&1; echo "== $name rc=$? $(($(date +%s)-s))s"; pack; }
i=0
for e in 1 1 0 1 0 1 0; do
  [ $SECONDS -gt 480 ] && break
  nb=$([ $i -gt 0 ] && echo --no-bytecode)
  step cs_${i}_p$e 90 env QWEN3VL_EARLY_PROBES=$e python3 -m bench.coldstart --precision bf16 --cold-only --seconds 3 --greedy-tokens 8 --deadline-s 75 $nb --commit $BENCH_COMMIT --out $R/cs_${i}_p$e
  grep -hE "first answer|first-serving|imported" $R/cs_${i}_p$e/coldstart.log | head -3 | cut -c1-200
  i=$((i+1))
done
