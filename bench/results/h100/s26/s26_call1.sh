set +e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $R/gpu.txt
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" | tee -a $R/gpu.txt
pack() { tar czf $OUT/r.tgz -C /tmp r; }
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off"
step() { local name=$1 t=$2; shift 2; local s=$(date +%s); timeout $t "$@" > $R/$name.log 2>&1; echo "== $name rc=$? $(($(date +%s)-s))s"; tail -3 $R/$name.log | cut -c1-300; pack; }
show() { for f in "$@"; do echo "-- $f"; grep -E "^engine +[0-9]|^greedy|decode path|start-up" $R/$f.log | cut -c1-220; done; }
# 1. programmatic dependent launch (kernels/pdl.py): off / late / early, bf16, same work (greedy: the tokens must not change)
step m_bf16_pdl0 100 env QWEN3VL_PDL=0 $M --precision bf16 --sections engine,greedy --check-tokens 24 --out $R/m_bf16_pdl0.json
step m_bf16_pdl2 100 env QWEN3VL_PDL=2 $M --precision bf16 --sections engine,greedy --check-tokens 24 --out $R/m_bf16_pdl2.json
step m_bf16_pdl1 80 env QWEN3VL_PDL=1 $M --precision bf16 --sections engine --out $R/m_bf16_pdl1.json
show m_bf16_pdl0 m_bf16_pdl2 m_bf16_pdl1
# 2. int4 at one row: tile 7 against tile 6 (today's picks come first per shape), PDL late
step quant 150 env QWEN3VL_PDL=2 python3 -m bench.quant_check --sections sweep --rows 1 --formats int4 --int4-kernels 6,7 --sweep-s 110 --out $R/quant.json
grep -h '^sweep' $R/quant.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l[6:]); print(r['name'], r['rows'], 'cublas', r['bf16_cublas_us'], 'int4', r.get('int4_us'), r.get('int4_cfg'), r.get('int4_gb_s'), 'GB/s; default', r.get('int4_default_us'), r.get('int4_best_by_kernel'))"
# 3. the engine, int4: PDL off / late (TUNED), late with the sweep's picks
step m_int4_pdl0 80 env QWEN3VL_PDL=0 $M --precision int4 --sections engine --out $R/m_int4_pdl0.json
step m_int4_pdl2 80 env QWEN3VL_PDL=2 $M --precision int4 --sections engine --out $R/m_int4_pdl2.json
step m_int4_pdl2_swept 80 env QWEN3VL_PDL=2 QWEN3VL_KERNEL_TUNING=$R/quant.json $M --precision int4 --sections engine --out $R/m_int4_pdl2_swept.json
show m_int4_pdl0 m_int4_pdl2 m_int4_pdl2_swept
