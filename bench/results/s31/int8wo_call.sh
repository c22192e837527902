# Issue 13's last open check (bench/README's list, item 0): int8wo against bf16 at 32 streams in one call (the target:
# int8wo >= bf16; session 21 measured 1.01x, and bf16 has gained ~3% since from PDL, which int8wo does not take).
# ~4 min warm on an H100 or H200.
#   BENCH_COMMIT=<commit> bash bench/results/s31/int8wo_call.sh
# bf16 and int8wo as served, int8wo with PDL late everywhere (QWEN3VL_PDL=2: whether its kernels gain from it as
# int4's and bf16's did), two rounds each, the engine at 1 and 32 streams.
set +e
. bench/device_setup.sh w8
M="python3 -m bench.matrix --model random-weights:4b --streams 1,32 --compile off --sections engine"
for c in "bf16 - 1" "int8wo - 1" "int8wo 2 1" "bf16 - 2" "int8wo - 2" "int8wo 2 2"; do set -- $c
  [ $SECONDS -gt ${BUDGET_S:-420} ] && break
  E=; [ $2 != - ] && E="QWEN3VL_PDL=$2"
  timeout 80 env $E $M --precision $1 --out $R/m_$1_pdl$2_$3.json > $R/m_$1_pdl$2_$3.log 2>&1
  echo "== $1 pdl$2 $3 rc=$? $SECONDS"; grep -E "^$1 engine|Error|error" $R/m_$1_pdl$2_$3.log | cut -c1-120; pack
done
