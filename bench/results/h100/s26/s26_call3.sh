set +e
[ -d /tmp/site/gradio ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/r5; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt; uptime | tee -a $R/gpu.txt
pack() { tar czf $OUT/r5.tgz -C /tmp r5; }
cs() { local s=$(date +%s); timeout 200 python3 -m bench.coldstart --precision $1 --deadline-s 190 $2 --commit $BENCH_COMMIT --out $R/cs_$1 > $R/cs_$1.log 2>&1; echo "== cs $1 rc=$? $(($(date +%s)-s))s"; grep -hE "cold:|artifacts:|precompile:" $R/cs_$1/coldstart.log | cut -c1-200; pack; }
# 1. issue 14 on this machine from its first launch: cold, precompile, the artifacts launch (bf16)
cs bf16
# 2. PDL: early (1) / late (2) / off (0) per precision, fp8 also late with its own kernels left out
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "bf16 0" "bf16 1" "int4 1" "int4 2" "fp8 0" "fp8 1" "fp8 2 fp8"; do set -- $c
  [ $SECONDS -gt 470 ] && break
  n=m_$1_pdl$2${3:+_skip$3}; timeout 70 env QWEN3VL_PDL=$2 QWEN3VL_PDL_SKIP=$3 $M --precision $1 --out $R/$n.json > $R/$n.log 2>&1
  echo "== $n rc=$?"; grep -E "^$1 engine" $R/$n.log | cut -c1-100; pack
done
[ $SECONDS -lt 420 ] && cs int4 --no-bytecode
