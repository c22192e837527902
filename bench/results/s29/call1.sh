# Session 29, call 1: session 28's next_call1.sh trimmed to the device time left after refused starts: the one-row
# int4 sweep with consumers, then the engine with the sweep's picks against TUNED, and bf16, at 1 and 32 streams.
#   BENCH_COMMIT=<commit> bash bench/results/s29/call1.sh      (~5.5 min warm)
SWEEP_S=${SWEEP_S:-70} BUDGET_S=${BUDGET_S:-280} PROFILE_BUDGET_S=0 bash bench/results/h100/s28/next_call1.sh
