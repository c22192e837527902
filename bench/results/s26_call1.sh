set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt
pack() { tar czf $OUT/r.tgz -C /tmp r; }
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --sections engine --compile off"
step() { local name=$1 t=$2; shift 2; local s=$(date +%s); timeout $t "$@" > $R/$name.log 2>&1; echo "== $name rc=$? $(($(date +%s)-s))s"; tail -4 $R/$name.log | cut -c1-400; pack; }
# 1. int4 at one row: tile 7 against tile 6 (and today's picks, which come first per shape)
step quant 170 python3 -m bench.quant_check --sections sweep --rows 1 --formats int4 --int4-kernels 6,7 --sweep-s 140 --out $R/quant.json
grep -h '^sweep' $R/quant.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l[6:]); print(r['name'], r['rows'], 'cublas', r['bf16_cublas_us'], 'int4', r.get('int4_us'), r.get('int4_cfg'), r.get('int4_gb_s'), 'GB/s default', r.get('int4_default_us'), r.get('int4_best_by_kernel'))"
# 2. the engine: bf16, int4 with TUNED, int4 with the sweep's picks (same machine, same work)
step m_bf16 90 $M --precision bf16 --out $R/m_bf16.json
step m_int4 90 $M --precision int4 --out $R/m_int4.json
step m_int4_swept 90 env QWEN3VL_KERNEL_TUNING=$R/quant.json $M --precision int4 --out $R/m_int4_swept.json
for f in m_bf16 m_int4 m_int4_swept; do echo "-- $f"; grep -E "^engine +[0-9]|start-up" $R/$f.log | cut -c1-200; done
# 3. issue 14: the early probes' A/B (a discarded first launch, then =1 / =0 alternating), while the call has time
i=0
for e in 1 1 0 1 0; do
  [ $SECONDS -gt 500 ] && break  # the call has 600 s; a launch takes up to 85
  nb=$([ $i -gt 0 ] && echo --no-bytecode)
  step cs_${i}_p$e 85 env QWEN3VL_EARLY_PROBES=$e python3 -m bench.coldstart --precision bf16 --cold-only --seconds 3 --greedy-tokens 8 --deadline-s 70 $nb --commit $BENCH_COMMIT --out $R/cs_${i}_p$e
  grep -hE "first answer|first-serving|imported" $R/cs_${i}_p$e/coldstart.log | head -4 | cut -c1-160
  i=$((i+1))
done
