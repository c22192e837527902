set +e
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=0beede1
R=/tmp/r; mkdir -p $R/cs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt
pack() { tar czf $OUT/r.tgz -C /tmp r; }
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32"
step() { local name=$1 t=$2; shift 2; local s=$(date +%s); timeout $t "$@" > $R/$name.log 2>&1; echo "== $name rc=$? $(($(date +%s)-s))s"; grep -iE "layers|decode path" $R/$name.log | head -2 | cut -c1-300; tail -4 $R/$name.log | cut -c1-400; pack; }
step bf16_eager_fused 75 $M --precision bf16 --compile off --sections engine,greedy --check-tokens 24 --out $R/m_bf16_eager_fused.json
step bf16_compiled 75 $M --precision bf16 --compile on --sections engine --out $R/m_bf16_compiled.json
step bf16_eager_plain 60 env QWEN3VL_FUSED_LAYERS=0 $M --precision bf16 --compile off --sections engine --out $R/m_bf16_eager_plain.json
# Call 2 (same warm machine, /tmp/site kept from call 1):
#   export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 BENCH_COMMIT=0beede1; M="python3 -m bench.matrix --model random-weights:4b --streams 1,32"
#   timeout 70 $M --precision int4 --compile off --sections engine --out $R/m_int4_eager_fused.json
#   timeout 75 $M --precision int4 --compile on --sections engine --out $R/m_int4_compiled.json
# Call 3 (same machine): the same two lines with --precision fp8 (timeouts 60 and 62).
