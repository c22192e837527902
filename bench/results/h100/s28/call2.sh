# Session 28, call 2 (chained on call 1's machine): where a one-stream step's time goes now (step profile, int4 and bf16,
# the engine's default PDL), then the whole app through its doors (bench.suite plan c: the engine, then gradio_client,
# gradio-raw and /v1 at 32 and 1 chats). Env set by the caller (e.g. QWEN3VL_NORM_HANDOFF) reaches every process.
# Not run in session 28 (no device time left): ready for session 29.
set +e
. bench/device_setup.sh c2
mkdir -p $R/suite
for p in int4 bf16; do
  [ $SECONDS -gt ${PROFILE_S:-90} ] && break
  timeout 60 python3 -m bench.step_profile --model random-weights:4b --precision $p --compile off --out $R/sp_$p.json \
    > $R/sp_$p.log 2>&1; echo "== profile $p rc=$? $SECONDS"; tail -4 $R/sp_$p.log; pack
done
timeout $(( ${BUDGET_S:-560} - SECONDS )) python3 -m bench.suite --out $R/suite --commit $BENCH_COMMIT --plan c > $R/suite.log 2>&1
echo "== suite rc=$? $SECONDS"; tail -25 $R/suite.log; pack
