# Session 29, call 2 (chained on call 1's machine): the whole app through its doors (bench.suite plan c: the engine,
# then gradio_client, gradio-raw and /v1 at 32 and 1 chats), not measured since PDL.
#   BENCH_COMMIT=<commit> bash bench/results/s29/call2.sh      (~9 min)
set +e
. bench/device_setup.sh c2
mkdir -p $R/suite
timeout 580 python3 -m bench.suite --out $R/suite --commit $BENCH_COMMIT --plan c --deadline-s ${DEADLINE_S:-550} \
  > $R/suite.log 2>&1
echo "== suite rc=$? $SECONDS"; tail -25 $R/suite.log; pack
